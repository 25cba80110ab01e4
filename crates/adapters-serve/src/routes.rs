//! A/B routes: requests for a route name go to adapter versions in proportion to weights
//! (`{"sms": [{"adapter": "sms@3f9a1c2b", "weight": 90}, {"adapter": "sms@canary", "weight": 10}]}`).
//! A request's `user` keeps it on one variant; without one the variant is drawn at random.
//! The response's `route` field says which variant served it.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

/// One arm of a route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// `NAME`, `NAME@TAG` or `NAME@VERSION`.
    pub adapter: String,
    /// Share of the traffic, relative to the route's other variants.
    pub weight: f64,
}

/// Every route by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Routes(pub HashMap<String, Vec<Variant>>);

impl Routes {
    /// Reads routes from a JSON file; the error names the file and the route at fault.
    pub fn load(path: &std::path::Path) -> Result<Routes, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let routes: Routes = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for (name, variants) in &routes.0 {
            check(name, variants).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(routes)
    }

    /// The variant of route `name` for a request (sticky for a given `user`).
    pub fn pick(&self, name: &str, user: Option<&str>) -> Option<&str> {
        let variants = self.0.get(name)?;
        let total: f64 = variants.iter().map(|v| v.weight).sum();
        let draw = match user {
            Some(u) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (name, u).hash(&mut h);
                h.finish()
            }
            None => std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now()),
        };
        let mut point = (draw as f64 / u64::MAX as f64) * total;
        for v in variants {
            if point < v.weight {
                return Some(&v.adapter);
            }
            point -= v.weight;
        }
        variants.last().map(|v| v.adapter.as_str())
    }
}

/// A route must have a valid name and variants with valid references and positive weights.
pub fn check(name: &str, variants: &[Variant]) -> Result<(), String> {
    name.parse::<adapters_store::Name>().map_err(|e| format!("route `{name}`: {e}"))?;
    if variants.is_empty() {
        return Err(format!("route `{name}` has no variants"));
    }
    for v in variants {
        v.adapter.parse::<adapters_store::Reference>().map_err(|e| format!("route `{name}`: {e}"))?;
        if !(v.weight.is_finite() && v.weight > 0.0) {
            return Err(format!("route `{name}`: variant `{}` needs a positive weight, not {}", v.adapter, v.weight));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_splits_by_weight_and_users_stick_to_a_variant() {
        let routes = Routes(HashMap::from([(
            "ab".to_string(),
            vec![Variant { adapter: "a@v1".into(), weight: 3.0 }, Variant { adapter: "a@v2".into(), weight: 1.0 }],
        )]));
        let picks: Vec<&str> = (0..4000).map(|i| routes.pick("ab", Some(&format!("user-{i}"))).unwrap()).collect();
        let share = picks.iter().filter(|p| **p == "a@v1").count() as f64 / picks.len() as f64;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        assert_eq!(routes.pick("ab", Some("alice")), routes.pick("ab", Some("alice")));
        assert!(routes.pick("other", None).is_none());
        assert!(check("ab", &[Variant { adapter: "a".into(), weight: 0.0 }]).is_err());
        assert!(check("a/b", &[Variant { adapter: "a".into(), weight: 1.0 }]).is_err());
        assert!(check("ab", &[]).is_err());
    }
}
