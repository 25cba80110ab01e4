//! Adapter names, tags and references (`name`, `name@version`, `name@tag`).

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A validated adapter or tag name: 1 to 64 characters of `a-z`, `A-Z`, `0-9`, `.`, `_`,
/// `-`, starting with a letter or digit. Names become path segments in the store, so
/// nothing else (no `/`, no `..`) is accepted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if s.is_empty() || s.len() > 64 || !first_ok || !s.chars().all(ok_char) {
            return Err(Error::Invalid(format!(
                "`{s}` is not a valid name: use 1-64 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
            )));
        }
        Ok(Name(s.to_string()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hex digits of a version: the first 16 of its content digest.
pub const VERSION_DIGITS: usize = 16;

/// Whether `s` is exactly what a version is: 16 lowercase hex digits. Versions read from a
/// store (tags, manifests, listings) become path segments, so nothing else gets that far.
pub fn is_version(s: &str) -> bool {
    s.len() == VERSION_DIGITS && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether a selector after `@` reads as a version or a unique prefix of one (4 to 16
/// lowercase hex digits). Such selectors resolve to versions before tags, and no tag may
/// have such a name, so a tag can never shadow a version.
pub fn reads_as_version(s: &str) -> bool {
    (4..=VERSION_DIGITS).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Refuses a tag name that could be read as a version (see [`reads_as_version`]).
pub fn check_tag(tag: &Name) -> Result<()> {
    if reads_as_version(tag.as_str()) {
        return Err(Error::Invalid(format!(
            "tag `{tag}` could be read as a version (4 to 16 hex digits), so `NAME@{tag}` would be ambiguous; \
             choose a name with another letter in it (e.g. `v-{tag}`)"
        )));
    }
    Ok(())
}

/// A reference to one adapter version: `name` (its `latest` tag), `name@tag` or
/// `name@version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The adapter.
    pub name: Name,
    /// The version or tag; `None` means `latest`.
    pub selector: Option<String>,
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, selector) = match s.split_once('@') {
            Some((n, sel)) => {
                // A selector is a tag or a version: both are names' alphabet.
                sel.parse::<Name>().map_err(|_| Error::Invalid(format!("`{s}`: `{sel}` after `@` is not a valid version or tag")))?;
                (n, Some(sel.to_string()))
            }
            None => (s, None),
        };
        Ok(Reference { name: name.parse()?, selector })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Some(sel) => write!(f, "{}@{sel}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_their_folder_are_refused() {
        for bad in ["", "..", "../x", "a/b", "a\\b", ".hidden", "-x", "a b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?} accepted");
        }
        for good in ["pfeiffer", "sms-spam_v2.1", "A1"] {
            assert_eq!(good.parse::<Name>().unwrap().as_str(), good);
        }
    }

    #[test]
    fn versions_are_sixteen_lowercase_hex_digits_and_tags_cannot_look_like_one() {
        assert!(is_version("0123456789abcdef"));
        for bad in ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "../../../../out/", "/absolute/00000", "0123456789abcdeg"] {
            assert!(!is_version(bad), "{bad:?}");
        }
        for looks in ["beef", "0123", "0123456789abcdef", "cafe01"] {
            assert!(check_tag(&looks.parse().unwrap()).is_err(), "{looks}");
        }
        for fine in ["prod", "v-beef", "BEEF", "abc", "0123456789abcdef0", "latest", "canary-2"] {
            assert!(check_tag(&fine.parse().unwrap()).is_ok(), "{fine}");
        }
    }

    #[test]
    fn references_split_at_the_at_sign() {
        let r: Reference = "sms@prod".parse().unwrap();
        assert_eq!((r.name.as_str(), r.selector.as_deref()), ("sms", Some("prod")));
        assert_eq!("sms".parse::<Reference>().unwrap().selector, None);
        assert!("sms@../x".parse::<Reference>().is_err());
        assert!("../sms@prod".parse::<Reference>().is_err());
        assert_eq!("sms@3f9a".parse::<Reference>().unwrap().to_string(), "sms@3f9a");
    }
}
