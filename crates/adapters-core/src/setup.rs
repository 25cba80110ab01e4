//! The active composition of adapters: AdapterHub's blocks (Stack, Fuse, Parallel, Average,
//! BatchSplit, Split) as a tree, written as an expression such as `stack(lang, fuse(a, b))`
//! and saved as `adapter_setup.json`.

use crate::Error;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The file a setup is saved in.
pub const SETUP_FILE: &str = "adapter_setup.json";

/// One node of a composition tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "block", rename_all = "snake_case", deny_unknown_fields)]
pub enum Setup {
    /// One attached adapter, by name.
    Adapter {
        /// The adapter's name in the set.
        name: String,
    },
    /// Children applied one after the other (each sees the previous one's output).
    Stack {
        /// The children, in order.
        children: Vec<Setup>,
    },
    /// An AdapterFusion layer over the children's outputs at each site they share.
    Fuse {
        /// The children (bottleneck adapters or stacks of them).
        children: Vec<Setup>,
        /// The attached fusion adapter that combines them; `None`: the one named after
        /// the children joined by commas (AdapterHub's naming, e.g. `sentiment,topic`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fusion: Option<String>,
    },
    /// One input, one output per child in a single pass: the batch is repeated once per
    /// child and child `i` runs on the `i`-th copy.
    Parallel {
        /// The children; output rows `i·batch .. (i+1)·batch` are child `i`'s.
        children: Vec<Setup>,
    },
    /// The children's outputs combined as `Σ wᵢ·outᵢ / n` (AdapterHub's output averaging).
    Average {
        /// The children.
        children: Vec<Setup>,
        /// One weight per child (may be negative).
        weights: Vec<f32>,
    },
    /// Rows of the batch per child: the first `sizes[0]` rows go to child 0, and so on.
    BatchSplit {
        /// The children.
        children: Vec<Setup>,
        /// Rows per child; they must add up to the batch size.
        sizes: Vec<usize>,
    },
    /// Sequence positions per child: the first `splits[0]` positions go to child 0, ...
    Split {
        /// The children.
        children: Vec<Setup>,
        /// Positions per child; they must add up to the sequence length.
        splits: Vec<usize>,
    },
}

/// A block's kind, for the nesting rules and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Adapter,
    Stack,
    Fuse,
    Parallel,
    Average,
    BatchSplit,
    Split,
}

impl Block {
    fn name(self) -> &'static str {
        match self {
            Block::Adapter => "an adapter",
            Block::Stack => "stack",
            Block::Fuse => "fuse",
            Block::Parallel => "parallel",
            Block::Average => "average",
            Block::BatchSplit => "batch_split",
            Block::Split => "split",
        }
    }

    /// What may nest directly inside this block (AdapterHub's `ALLOWED_NESTINGS`).
    fn allowed_children(self) -> &'static [Block] {
        use Block::*;
        match self {
            Adapter => &[],
            Stack => &[Adapter, Fuse, Split, Parallel, BatchSplit, Average],
            Fuse => &[Adapter, Stack],
            Split => &[Adapter, Split, Stack, BatchSplit, Average],
            Parallel => &[Adapter, Stack, BatchSplit, Average],
            BatchSplit => &[Adapter, Stack, Split, BatchSplit, Average],
            Average => &[Adapter, Stack, Split, BatchSplit],
        }
    }
}

impl Setup {
    /// A stack of the named adapters (what activating a list of names means).
    pub fn stack<S: AsRef<str>>(names: &[S]) -> Setup {
        Setup::Stack { children: names.iter().map(|n| Setup::Adapter { name: n.as_ref().to_string() }).collect() }
    }

    fn block(&self) -> Block {
        match self {
            Setup::Adapter { .. } => Block::Adapter,
            Setup::Stack { .. } => Block::Stack,
            Setup::Fuse { .. } => Block::Fuse,
            Setup::Parallel { .. } => Block::Parallel,
            Setup::Average { .. } => Block::Average,
            Setup::BatchSplit { .. } => Block::BatchSplit,
            Setup::Split { .. } => Block::Split,
        }
    }

    /// The children of a block (none for an adapter).
    pub fn children(&self) -> &[Setup] {
        match self {
            Setup::Adapter { .. } => &[],
            Setup::Stack { children }
            | Setup::Fuse { children, .. }
            | Setup::Parallel { children }
            | Setup::Average { children, .. }
            | Setup::BatchSplit { children, .. }
            | Setup::Split { children, .. } => children,
        }
    }

    /// The direct children, to change in place.
    pub fn children_mut(&mut self) -> &mut [Setup] {
        match self {
            Setup::Adapter { .. } => &mut [],
            Setup::Stack { children }
            | Setup::Fuse { children, .. }
            | Setup::Parallel { children }
            | Setup::Average { children, .. }
            | Setup::BatchSplit { children, .. }
            | Setup::Split { children, .. } => children,
        }
    }

    /// Every adapter name in the tree, left to right (fusion layers not included).
    pub fn adapter_names(&self) -> Vec<String> {
        match self {
            Setup::Adapter { name } => vec![name.clone()],
            other => other.children().iter().flat_map(Setup::adapter_names).collect(),
        }
    }

    /// The fusion layers the tree's `Fuse` blocks use, by name.
    pub fn fusion_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Setup::Fuse { children, fusion } = self {
            out.push(fusion.clone().unwrap_or_else(|| Setup::default_fusion_name(children)));
        }
        out.extend(self.children().iter().flat_map(Setup::fusion_names));
        out
    }

    /// AdapterHub's name for a fusion over these children: their names joined by commas.
    pub fn default_fusion_name(children: &[Setup]) -> String {
        children.iter().flat_map(Setup::adapter_names).collect::<Vec<_>>().join(",")
    }

    /// How many copies of the batch the tree asks for (`parallel(a, b)`: 2; otherwise 1).
    pub fn parallel_width(&self) -> usize {
        match self {
            Setup::Parallel { children } => children.len(),
            other => other.children().iter().map(Setup::parallel_width).max().unwrap_or(1),
        }
    }

    /// Checks the tree's shape: allowed nestings (AdapterHub's table), at most two levels of
    /// blocks other than stacks, parameter counts matching the children, no empty block.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_at(0)
    }

    fn validate_at(&self, level: usize) -> Result<(), Error> {
        let block = self.block();
        if level > 1 && !matches!(block, Block::Stack | Block::Adapter) {
            return Err(Error::Setup(format!(
                "`{self}` is nested too deep: below the second level only stacks and adapters may appear (as in AdapterHub)"
            )));
        }
        if block != Block::Adapter && self.children().is_empty() {
            return Err(Error::Setup(format!("`{}` has no children; name at least one adapter inside it", block.name())));
        }
        let counts = |what: &str, n: usize| -> Result<(), Error> {
            if n != self.children().len() {
                return Err(Error::Setup(format!("`{self}` gives {n} {what} for {} children; give one per child", self.children().len())));
            }
            Ok(())
        };
        match self {
            Setup::Adapter { name } if name.is_empty() || name.contains(|c: char| "(),;=".contains(c) || c.is_whitespace()) => {
                return Err(Error::Setup(format!("`{name}` is not a usable adapter name (no spaces or any of `(),;=`)")));
            }
            Setup::Average { weights, .. } => counts("weights", weights.len())?,
            Setup::BatchSplit { sizes, .. } => counts("sizes", sizes.len())?,
            Setup::Split { splits, .. } => counts("splits", splits.len())?,
            _ => {}
        }
        for child in self.children() {
            let allowed = block.allowed_children();
            if !allowed.contains(&child.block()) {
                let names: Vec<_> = allowed.iter().map(|b| b.name()).collect();
                return Err(Error::Setup(format!(
                    "cannot nest `{child}` in {}: inside {} may go only {}",
                    block.name(),
                    block.name(),
                    names.join(", ")
                )));
            }
            child.validate_at(level + 1)?;
        }
        Ok(())
    }

    /// The setup without adapter `name` (merged into the base weights, so no longer run by
    /// the hooks): dropped from stacks, emptied stacks dropped; `None` when nothing is left.
    /// An adapter inside another block (whose weights, sizes or fusion name its children)
    /// cannot be taken out that way: an error says so.
    pub fn without(&self, name: &str) -> Result<Option<Setup>, Error> {
        match self {
            Setup::Adapter { name: n } => Ok(if n == name { None } else { Some(self.clone()) }),
            Setup::Stack { children } => {
                let kept = children.iter().map(|c| c.without(name)).collect::<Result<Vec<_>, _>>()?;
                let kept: Vec<Setup> = kept.into_iter().flatten().collect();
                Ok((!kept.is_empty()).then_some(Setup::Stack { children: kept }))
            }
            other if other.adapter_names().iter().any(|n| n == name) => Err(Error::Setup(format!(
                "`{name}` is inside `{other}`; taking it out would change that block: set a setup without it first"
            ))),
            other => Ok(Some(other.clone())),
        }
    }

    /// Writes the setup as `adapter_setup.json` in `dir` (atomically).
    pub fn save(&self, dir: &std::path::Path) -> Result<(), Error> {
        crate::io::write_atomic(&dir.join(SETUP_FILE), self.to_json().as_bytes())
    }

    /// Reads a setup from `path`: an `adapter_setup.json`, or a folder holding one.
    pub fn load(path: &std::path::Path) -> Result<Setup, Error> {
        let file = if path.is_dir() { path.join(SETUP_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::Io { path: file.clone(), message: e.to_string() })?;
        Setup::from_json(&text).map_err(|e| Error::Io { path: file, message: e.to_string() })
    }

    /// Reads `adapter_setup.json` text.
    pub fn from_json(text: &str) -> Result<Setup, Error> {
        let setup: Setup = serde_json::from_str(text).map_err(|e| Error::Setup(format!("not an adapter setup: {e}")))?;
        setup.validate()?;
        Ok(setup)
    }

    /// The `adapter_setup.json` text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("setups serialise")
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, children: &[Setup]| -> fmt::Result {
            for (i, c) in children.iter().enumerate() {
                if i > 0 {
                    write!(f, ", ")?;
                }
                write!(f, "{c}")?;
            }
            Ok(())
        };
        let nums = |xs: Vec<String>| xs.join(", ");
        match self {
            Setup::Adapter { name } => write!(f, "{name}"),
            Setup::Stack { children } => {
                write!(f, "stack(")?;
                list(f, children)?;
                write!(f, ")")
            }
            Setup::Fuse { children, fusion } => {
                write!(f, "fuse(")?;
                list(f, children)?;
                if let Some(name) = fusion {
                    write!(f, "; fusion={name}")?;
                }
                write!(f, ")")
            }
            Setup::Parallel { children } => {
                write!(f, "parallel(")?;
                list(f, children)?;
                write!(f, ")")
            }
            Setup::Average { children, weights } => {
                write!(f, "average(")?;
                list(f, children)?;
                write!(f, "; weights={})", nums(weights.iter().map(|w| w.to_string()).collect()))
            }
            Setup::BatchSplit { children, sizes } => {
                write!(f, "batch_split(")?;
                list(f, children)?;
                write!(f, "; sizes={})", nums(sizes.iter().map(|w| w.to_string()).collect()))
            }
            Setup::Split { children, splits } => {
                write!(f, "split(")?;
                list(f, children)?;
                write!(f, "; splits={})", nums(splits.iter().map(|w| w.to_string()).collect()))
            }
        }
    }
}

impl std::str::FromStr for Setup {
    type Err = Error;

    /// Parses an expression: `name`, `stack(a, b)`, `fuse(a, b)`, `fuse(a, b; fusion=NAME)`,
    /// `parallel(a, b)`, `average(a, b; weights=0.7, 0.3)` (no normalisation; add
    /// `normalize` to divide by their sum), `batch_split(a, b; sizes=2, 2)`,
    /// `split(a, b; splits=64, 64)`.
    fn from_str(text: &str) -> Result<Setup, Error> {
        let mut parser = Parser { text, pos: 0 };
        let setup = parser.setup()?;
        parser.skip_space();
        if parser.pos != text.len() {
            return Err(parser.error("unexpected text after the setup"));
        }
        setup.validate()?;
        Ok(setup)
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> Error {
        Error::Setup(format!(
            "{what} at character {} of `{}`; write e.g. `stack(a, fuse(b, c))` or `average(a, b; weights=0.7, 0.3)`",
            self.pos + 1,
            self.text
        ))
    }

    fn skip_space(&mut self) {
        while self.text[self.pos..].starts_with(char::is_whitespace) {
            self.pos += self.text[self.pos..].chars().next().map_or(1, char::len_utf8);
        }
    }

    fn word(&mut self) -> &str {
        self.skip_space();
        let start = self.pos;
        let rest = &self.text[start..];
        let len = rest.find(|c: char| "(),;=".contains(c) || c.is_whitespace()).unwrap_or(rest.len());
        self.pos += len;
        &self.text[start..start + len]
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.text[self.pos..].starts_with(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn setup(&mut self) -> Result<Setup, Error> {
        let word = self.word().to_string();
        if word.is_empty() {
            return Err(self.error("expected an adapter name or a block"));
        }
        if !self.eat('(') {
            return Ok(Setup::Adapter { name: word });
        }
        let mut children = vec![self.setup()?];
        while self.eat(',') {
            children.push(self.setup()?);
        }
        let mut params: Vec<(String, Vec<String>)> = Vec::new();
        if self.eat(';') {
            loop {
                let key = self.word().to_string();
                let mut values = Vec::new();
                if self.eat('=') {
                    values.push(self.word().to_string());
                    // Further values of the same key: `weights=0.7, 0.3`.
                    loop {
                        let save = self.pos;
                        if !self.eat(',') {
                            break;
                        }
                        let next = self.word().to_string();
                        if self.eat('=') || next.is_empty() {
                            self.pos = save;
                            break;
                        }
                        values.push(next);
                    }
                }
                params.push((key, values));
                if !self.eat(';') && !self.eat(',') {
                    break;
                }
            }
        }
        if !self.eat(')') {
            return Err(self.error("expected `)`"));
        }
        self.block(&word, children, params)
    }

    fn block(&self, word: &str, children: Vec<Setup>, params: Vec<(String, Vec<String>)>) -> Result<Setup, Error> {
        let take = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let allowed: &[&str] = match word {
            "stack" | "parallel" => &[],
            "fuse" => &["fusion"],
            "average" => &["weights", "normalize"],
            "batch_split" => &["sizes"],
            "split" => &["splits"],
            other => {
                return Err(self.error(&format!("unknown block `{other}` (blocks: stack, fuse, parallel, average, batch_split, split)")))
            }
        };
        if let Some((k, _)) = params.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(self.error(&format!("`{word}` takes no parameter `{k}` (it takes: {})", allowed.join(", "))));
        }
        let numbers = |key: &str, values: Option<Vec<String>>| -> Result<Option<Vec<f64>>, Error> {
            values
                .map(|vs| {
                    vs.iter().map(|v| v.parse::<f64>().map_err(|_| self.error(&format!("`{key}` value `{v}` is not a number")))).collect()
                })
                .transpose()
        };
        let counts = |key: &str, values: Option<Vec<String>>| -> Result<Vec<usize>, Error> {
            let vs = values.ok_or_else(|| self.error(&format!("`{word}` needs `{key}=N, N, ...` (one per child)")))?;
            vs.iter().map(|v| v.parse::<usize>().map_err(|_| self.error(&format!("`{key}` value `{v}` is not a count")))).collect()
        };
        Ok(match word {
            "stack" => Setup::Stack { children },
            "parallel" => Setup::Parallel { children },
            "fuse" => Setup::Fuse { children, fusion: take("fusion").and_then(|v| v.first().cloned()) },
            "average" => {
                let n = children.len();
                let mut weights = numbers("weights", take("weights"))?.unwrap_or_else(|| vec![1.0 / n as f64; n]);
                if take("normalize").is_some() {
                    let sum: f64 = weights.iter().sum();
                    if sum == 0.0 {
                        return Err(self.error("`normalize` needs weights that do not add up to 0"));
                    }
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                Setup::Average { children, weights: weights.into_iter().map(|w| w as f32).collect() }
            }
            "batch_split" => Setup::BatchSplit { sizes: counts("sizes", take("sizes"))?, children },
            _ => Setup::Split { splits: counts("splits", take("splits"))?, children },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Setup;

    #[test]
    fn expressions_parse_print_and_round_trip_through_json() {
        for text in [
            "a",
            "stack(a, b)",
            "fuse(a, b, c)",
            "stack(lang, fuse(a, b; fusion=ab))",
            "average(a, b; weights=0.7, -0.3)",
            "parallel(a, stack(b, c))",
            "batch_split(a, b; sizes=2, 3)",
            "split(a, b; splits=64, 64)",
        ] {
            let s: Setup = text.parse().unwrap();
            assert_eq!(s.to_string(), text);
            assert_eq!(Setup::from_json(&s.to_json()).unwrap(), s);
        }
        let avg: Setup = "average(a,b;weights=1,3;normalize)".parse().unwrap();
        assert_eq!(avg, Setup::Average { children: vec![leaf("a"), leaf("b")], weights: vec![0.25, 0.75] });
        let fuse: Setup = "fuse(a, b)".parse().unwrap();
        assert_eq!(fuse.fusion_names(), ["a,b"]);
        assert_eq!("stack(x, parallel(a, b, c))".parse::<Setup>().unwrap().parallel_width(), 3);
    }

    fn leaf(name: &str) -> Setup {
        Setup::Adapter { name: name.into() }
    }

    #[test]
    fn merged_adapters_leave_stacks_but_not_other_blocks() {
        let s: Setup = "stack(lora, fuse(a, b))".parse().unwrap();
        assert_eq!(s.without("lora").unwrap().unwrap().to_string(), "stack(fuse(a, b))");
        assert_eq!(Setup::stack(&["lora"]).without("lora").unwrap(), None);
        assert!(s.without("a").unwrap_err().to_string().contains("`a` is inside `fuse(a, b)`"));
        assert_eq!(s.without("other").unwrap().unwrap(), s);
    }

    #[test]
    fn setups_save_and_load_as_adapter_setup_json() {
        let dir = std::env::temp_dir().join(format!("setup-json-{}", std::process::id()));
        let s: Setup = "stack(lang, fuse(a, b))".parse().unwrap();
        s.save(&dir).unwrap();
        assert_eq!(Setup::load(&dir).unwrap(), s);
        assert_eq!(Setup::load(&dir.join(super::SETUP_FILE)).unwrap(), s);
        std::fs::write(dir.join(super::SETUP_FILE), r#"{"block": "fuse", "children": [{"block": "parallel", "children": []}]}"#).unwrap();
        let e = Setup::load(&dir).unwrap_err().to_string();
        assert!(e.contains("adapter_setup.json") && e.contains("cannot nest"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_setups_are_refused_with_what_may_nest_where() {
        let err = |t: &str| t.parse::<Setup>().unwrap_err().to_string();
        assert!(err("fuse(a, parallel(b, c))").contains("inside fuse may go only an adapter, stack"), "{}", err("fuse(a, parallel(b, c))"));
        assert!(err("average(a, fuse(b, c); weights=1, 1)").contains("cannot nest `fuse(b, c)` in average"));
        assert!(err("average(a, b; weights=1)").contains("gives 1 weights for 2 children"));
        assert!(err("batch_split(a, b)").contains("needs `sizes="));
        assert!(err("stack(a, b").contains("expected `)`"));
        assert!(err("merge(a, b)").contains("unknown block `merge`"));
        assert!(err("average(a, b; weights=x, 1)").contains("`weights` value `x` is not a number"));
        assert!(err("stack(split(a, stack(b, split(c, d; splits=1, 1)); splits=1, 1))").contains("nested too deep"));
        assert!(err("stack()").contains("expected an adapter name"));
    }
}
