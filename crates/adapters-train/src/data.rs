//! Reading training data: JSONL or CSV with configurable text and label fields (labels as
//! strings or integers), and plain text for language modelling. A bad row is an error
//! naming the file and line, or, when the caller allows it, skipped and counted.

use crate::error::{fail, Result, Within};
use std::collections::BTreeSet;
use std::path::Path;

/// One labelled text.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// Its label.
    pub label: String,
    /// The line the row starts on in its file (1-based), for error messages.
    pub line: usize,
    /// A JSONL row's `conditioning` array: the vector hypernetworks generate this row's
    /// adapter from (in place of a task's embedding).
    pub conditioning: Option<Vec<f32>>,
}

/// Which fields hold the text and the label, and what to do with bad rows.
#[derive(Clone, Debug)]
pub struct Fields {
    /// Field or column with the text.
    pub text: String,
    /// Field or column with the label.
    pub label: String,
    /// Skip bad rows (and count them) instead of failing.
    pub skip_bad_rows: bool,
}

impl Default for Fields {
    fn default() -> Self {
        Fields { text: "text".into(), label: "label".into(), skip_bad_rows: false }
    }
}

/// Rows read and rows skipped.
#[derive(Debug, Default, PartialEq)]
pub struct Read {
    /// The good rows, in file order.
    pub examples: Vec<Example>,
    /// Bad rows skipped.
    pub skipped: usize,
}

fn exists(path: &Path) -> Result<()> {
    if !path.exists() {
        fail!(Data, "{} does not exist (relative paths start at the working directory; the project's datasets are written to data/ by `cargo xtask fetch`)", path.display());
    }
    Ok(())
}

fn label_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads labelled examples from a `.jsonl` or `.csv` file.
pub fn read_labelled(path: &Path, fields: &Fields) -> Result<Read> {
    exists(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let rows: Vec<(usize, std::result::Result<Example, String>)> = match ext {
        "jsonl" | "json" => read_jsonl(path, fields)?,
        "csv" => read_csv(path, fields)?,
        other => fail!(Data, "{}: unknown data format `.{other}`; use .jsonl or .csv", path.display()),
    };
    let mut out = Read::default();
    for (line, row) in rows {
        match row {
            Ok(e) => out.examples.push(Example { line, ..e }),
            Err(_) if fields.skip_bad_rows => out.skipped += 1,
            Err(why) => fail!(Data, "{}:{line}: {why} (fix the row, or allow skipping bad rows)", path.display()),
        }
    }
    if out.examples.is_empty() {
        fail!(Data, "{}: no usable rows", path.display());
    }
    Ok(out)
}

fn check(text: Option<String>, label: Option<String>, fields: &Fields) -> std::result::Result<Example, String> {
    let text = text.ok_or_else(|| format!("missing text field `{}`", fields.text))?;
    if text.trim().is_empty() {
        return Err(format!("empty text in field `{}`", fields.text));
    }
    let label = label.ok_or_else(|| format!("missing or non-scalar label field `{}`", fields.label))?;
    Ok(Example { text, label, line: 0, conditioning: None })
}

fn read_jsonl(path: &Path, fields: &Fields) -> Result<Vec<(usize, std::result::Result<Example, String>)>> {
    let body = std::fs::read_to_string(path).within(|| format!("reading {}", path.display()))?;
    Ok(body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row = match serde_json::from_str::<serde_json::Value>(l) {
                Err(e) => Err(format!("not a JSON object: {e}")),
                Ok(v) => check(v[&fields.text].as_str().map(String::from), label_string(&v[&fields.label]), fields).and_then(|e| {
                    match v.get("conditioning") {
                        None => Ok(e),
                        Some(c) => serde_json::from_value::<Vec<f32>>(c.clone())
                            .map(|c| Example { conditioning: Some(c), ..e })
                            .map_err(|_| "`conditioning` must be an array of numbers".to_string()),
                    }
                }),
            };
            (i + 1, row)
        })
        .collect())
}

fn read_csv(path: &Path, fields: &Fields) -> Result<Vec<(usize, std::result::Result<Example, String>)>> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(path).within(|| format!("reading {}", path.display()))?;
    let headers = reader.headers().within(|| format!("{}: no header row", path.display()))?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (Some(t), Some(l)) = (col(&fields.text), col(&fields.label)) else {
        fail!(
            Data,
            "{}: the header has no `{}` or no `{}` column (columns: {})",
            path.display(),
            fields.text,
            fields.label,
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let row = match record {
            Err(e) => Err(format!("not a CSV row: {e}")),
            Ok(r) => check(r.get(t).map(String::from), r.get(l).map(String::from), fields),
        };
        rows.push((line, row));
    }
    Ok(rows)
}

/// Checks that every label of a dev or test set was seen in training.
pub fn check_labels(path: &Path, examples: &[Example], known: &BTreeSet<String>) -> Result<()> {
    if let Some(e) = examples.iter().find(|e| !known.contains(&e.label)) {
        fail!(
            Data,
            "{}:{}: label `{}` does not occur in the training data (known: {})",
            path.display(),
            e.line,
            e.label,
            known.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Plain text for language modelling: documents separated by blank lines.
pub fn read_text(path: &Path) -> Result<Vec<String>> {
    exists(path)?;
    let body = std::fs::read_to_string(path).within(|| format!("reading {}", path.display()))?;
    let docs: Vec<String> = body.split("\n\n").map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect();
    if docs.is_empty() {
        fail!(Data, "{}: no text", path.display());
    }
    Ok(docs)
}

/// Conversations for chat fine-tuning: JSONL, one `{"messages": [{"role", "content"}, ...]}`
/// per line (OpenAI's chat format), roles `system`, `user` or `assistant`, with at least
/// one assistant message each (the loss is on the assistant's tokens).
pub fn read_chats(path: &Path) -> Result<Vec<Vec<adapters_models::Message>>> {
    exists(path)?;
    let body = std::fs::read_to_string(path).within(|| format!("reading {}", path.display()))?;
    let mut chats = Vec::new();
    for (i, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        #[derive(serde::Deserialize)]
        struct Row {
            messages: Vec<adapters_models::Message>,
        }
        let row: Row = serde_json::from_str(line).map_err(|e| {
            crate::error::Error::Data(format!(
                "{}:{}: not a chat row ({e}); each line is {{\"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}, ...]}}",
                path.display(),
                i + 1
            ))
        })?;
        if let Some(m) = row.messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
            fail!(Data, "{}:{}: role `{}`; use system, user or assistant", path.display(), i + 1, m.role);
        }
        if !row.messages.iter().any(|m| m.role == "assistant") {
            fail!(Data, "{}:{}: no assistant message, so nothing to learn from", path.display(), i + 1);
        }
        chats.push(row.messages);
    }
    if chats.is_empty() {
        fail!(Data, "{}: no conversations", path.display());
    }
    Ok(chats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, body: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("train-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn jsonl_and_csv_with_string_or_integer_labels() {
        let p = file("a.jsonl", "{\"text\":\"good\",\"label\":\"pos\"}\n\n{\"text\":\"bad\",\"label\":0}\n");
        let r = read_labelled(&p, &Fields::default()).unwrap();
        assert_eq!(
            r.examples,
            vec![
                Example { text: "good".into(), label: "pos".into(), line: 1, conditioning: None },
                Example { text: "bad".into(), label: "0".into(), line: 3, conditioning: None }
            ]
        );
        let p = file("b.csv", "id,sentence,y\n1,\"a, quoted\",x\n2,plain,y\n");
        let f = Fields { text: "sentence".into(), label: "y".into(), skip_bad_rows: false };
        assert_eq!(read_labelled(&p, &f).unwrap().examples[0].text, "a, quoted");
    }

    #[test]
    fn bad_rows_name_file_and_line_or_are_counted() {
        let p = file("bad.jsonl", "{\"text\":\"ok\",\"label\":\"a\"}\n{\"text\":\"\",\"label\":\"a\"}\n{\"label\":\"a\"}\nnot json\n");
        let e = read_labelled(&p, &Fields::default()).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("empty text"), "{e}");
        let r = read_labelled(&p, &Fields { skip_bad_rows: true, ..Fields::default() }).unwrap();
        assert_eq!((r.examples.len(), r.skipped), (1, 3));
        let p = file("c.csv", "text,label\nfine,a\n");
        let e = read_labelled(&p, &Fields { label: "class".into(), ..Fields::default() }).unwrap_err().to_string();
        assert!(e.contains("`class`") && e.contains("text, label"), "{e}");
        let known: BTreeSet<String> = ["a".to_string()].into();
        let e = check_labels(&p, &[Example { text: "t".into(), label: "b".into(), line: 7, conditioning: None }], &known)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.csv:7: label `b`"), "{e}");
        assert!(read_labelled(&file("x.txt", "hi"), &Fields::default()).is_err());
    }

    #[test]
    fn text_documents_split_on_blank_lines() {
        let p = file("t.txt", "hi there\nhello.\n\n\nsecond\n");
        assert_eq!(read_text(&p).unwrap(), vec!["hi there\nhello.".to_string(), "second".to_string()]);
    }
}
