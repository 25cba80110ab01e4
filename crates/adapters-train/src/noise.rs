//! Seeded character-level noise for robustness tests: typos (a neighbouring key on a
//! QWERTY keyboard), swaps with the next character, dropped and doubled characters.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: [&str; 4] = ["1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm"];

/// The keys next to `c` on its keyboard row and the rows above and below (lowercase).
fn neighbours(c: char) -> Vec<char> {
    let lower = c.to_ascii_lowercase();
    let Some((r, i)) = ROWS.iter().enumerate().find_map(|(r, row)| row.find(lower).map(|i| (r, i))) else { return Vec::new() };
    let mut out = Vec::new();
    for row in [r.checked_sub(1), Some(r), Some(r + 1)].into_iter().flatten().filter_map(|r| ROWS.get(r)) {
        let keys: Vec<char> = row.chars().collect();
        for j in i.saturating_sub(1)..=(i + 1).min(keys.len().saturating_sub(1)) {
            if keys.get(j).is_some_and(|&k| k != lower) {
                out.push(keys[j]);
            }
        }
    }
    out
}

/// `text` with each letter or digit, at probability `rate`, replaced by a neighbouring key
/// (case kept), swapped with the next character, dropped or doubled (one of the four,
/// equally likely). The same `seed` gives the same text; other characters stay.
pub fn perturb_characters(text: &str, rate: f64, seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if !c.is_alphanumeric() || rng.random::<f64>() >= rate {
            out.push(c);
            i += 1;
            continue;
        }
        match rng.random_range(0..4) {
            0 => {
                let keys = neighbours(c);
                let typo = if keys.is_empty() { c } else { keys[rng.random_range(0..keys.len())] };
                out.push(if c.is_uppercase() { typo.to_ascii_uppercase() } else { typo });
            }
            1 if i + 1 < chars.len() => {
                out.push(chars[i + 1]);
                out.push(c);
                i += 1;
            }
            1 => out.push(c),
            2 => {}
            _ => {
                out.push(c);
                out.push(c);
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_and_at_about_its_rate() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let a = perturb_characters(&text, 0.1, 7);
        assert_eq!(a, perturb_characters(&text, 0.1, 7), "the same seed: the same text");
        assert_ne!(a, perturb_characters(&text, 0.1, 8), "another seed: another text");
        assert_eq!(perturb_characters(&text, 0.0, 7), text, "rate 0 changes nothing");
        // Compare word by word: about 10% of 35 letters per sentence touched → most words stay.
        let same = a.split(' ').zip(text.split(' ')).filter(|(x, y)| x == y).count();
        let words = text.split(' ').count();
        assert!(same > words / 2 && same < words, "{same} of {words} words unchanged");
        assert!(a.chars().filter(|c| !c.is_alphanumeric()).count() >= text.chars().filter(|c| !c.is_alphanumeric()).count() - 40);
    }

    #[test]
    fn typos_are_neighbouring_keys() {
        let s: String = neighbours('s').into_iter().collect();
        assert_eq!(s, "qweadzxc", "the keys around s");
        assert_eq!(neighbours('P').into_iter().collect::<String>(), "90ol", "case ignored; row ends");
        assert!(neighbours('é').is_empty());
        let typo = perturb_characters("S", 1.0, 3);
        assert!(typo.is_empty() || typo == "S" || typo == "SS" || "QWEADZXC".contains(&typo), "{typo}");
    }
}
