//! The one writer of RESULTS.md. The file is hand-written prose around marked sections;
//! each section is written by one study from its runs, between
//! `<!-- ID: written by `cargo studies COMMAND` -->` and `<!-- /ID -->`. A section whose
//! runs are on this machine is replaced, a missing one is inserted in document order, and
//! everything else (other sections, text between them) is kept as it is: the runs live
//! on the machine that made them.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// A marked section of RESULTS.md.
#[derive(Debug, PartialEq, Eq)]
pub struct Section {
    /// The marker's name.
    pub id: &'static str,
    /// The `cargo studies` subcommand that writes it.
    pub command: &'static str,
}

impl Section {
    fn begin(&self) -> String {
        format!("<!-- {}: written by `cargo studies {}` -->", self.id, self.command)
    }

    fn end(&self) -> String {
        format!("<!-- /{} -->", self.id)
    }
}

pub const QUALITY: Section = Section { id: "quality", command: "quality" };
pub const CHAT: Section = Section { id: "chat", command: "quality --only chat" };
pub const FUSION: Section = Section { id: "fusion-study", command: "fusion" };
pub const MOE: Section = Section { id: "moe-study", command: "moe" };
pub const MOE_LONGER: Section = Section { id: "moe-study longer", command: "moe --only longer" };
pub const HYPER: Section = Section { id: "hyper-study", command: "hyper" };
pub const HYPER_SHARED_HEAD: Section = Section { id: "hyper-study shared head", command: "hyper --only shared_head" };
pub const FED: Section = Section { id: "fed-study", command: "fed" };
pub const CONTINUAL: Section = Section { id: "continual-study", command: "continual" };
pub const VERSUS: Section = Section { id: "versus-study", command: "versus" };
pub const ROBUST: Section = Section { id: "robust-study", command: "robust" };
pub const INT8: Section = Section { id: "int8-study", command: "int8" };
pub const QLORA: Section = Section { id: "qlora-study", command: "qlora" };
pub const OTHER_RUNS: Section = Section { id: "other-runs", command: "quality" };

/// Every section, in the order RESULTS.md has them.
const ORDER: [&Section; 14] = [
    &QUALITY,
    &CHAT,
    &FUSION,
    &MOE,
    &MOE_LONGER,
    &HYPER,
    &HYPER_SHARED_HEAD,
    &FED,
    &CONTINUAL,
    &VERSUS,
    &ROBUST,
    &INT8,
    &QLORA,
    &OTHER_RUNS,
];

/// Rewrites `root/RESULTS.md` (atomically) with these sections' fresh text.
pub fn update(root: &Path, fresh: &[(&Section, String)]) -> Result<()> {
    let path = root.join("RESULTS.md");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).context("reading RESULTS.md"),
    };
    let text = updated(&text, fresh).context("RESULTS.md")?;
    adapters_core::io::write_atomic(&path, text.as_bytes()).context("writing RESULTS.md")?;
    let ids: Vec<&str> = fresh.iter().map(|(s, _)| s.id).collect();
    eprintln!("wrote RESULTS.md ({})", if ids.is_empty() { "no runs here: unchanged".into() } else { ids.join(", ") });
    Ok(())
}

/// `text` with each section of `fresh` replaced (or inserted before the first section
/// that follows it in [`ORDER`], else at the end).
pub fn updated(text: &str, fresh: &[(&Section, String)]) -> Result<String> {
    let mut text = text.to_string();
    for (section, body) in fresh {
        let block = format!("{}\n{}\n{}\n", section.begin(), body.trim_end_matches('\n'), section.end());
        match find(&text, section)? {
            Some((from, to)) => text.replace_range(from..to, &block),
            None => {
                let later = ORDER.iter().skip_while(|s| s.id != section.id).skip(1);
                let at = later.filter_map(|s| find(&text, s).transpose()).next().transpose()?.map_or(text.len(), |(from, _)| from);
                let gap = if at == 0 || text[..at].ends_with("\n\n") {
                    ""
                } else if text[..at].ends_with('\n') {
                    "\n"
                } else {
                    "\n\n"
                };
                text.insert_str(at, &format!("{gap}{block}\n"));
            }
        }
    }
    Ok(text)
}

/// Where a section is, from its begin marker to the end of its end marker's line.
fn find(text: &str, section: &Section) -> Result<Option<(usize, usize)>> {
    let begin = format!("<!-- {}: written by ", section.id);
    let end = section.end();
    match (text.find(&begin), text.find(&end)) {
        (None, None) => Ok(None),
        (Some(from), Some(to)) if from < to => {
            let to = to + end.len();
            Ok(Some((from, if text[to..].starts_with('\n') { to + 1 } else { to })))
        }
        _ => bail!("the section `{}` has its begin marker or its end marker, not both in order: fix the markers by hand", section.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Results\n\n<!-- quality: written by `cargo studies quality` -->\nold tables\n<!-- /quality -->\n\n\
                       hand-written note\n\n<!-- fed-study: written by `cargo studies fed` -->\nold fed\n<!-- /fed-study -->\n";

    #[test]
    fn a_section_is_replaced_and_the_text_around_it_kept() {
        let out = updated(DOC, &[(&QUALITY, "new tables\n".into())]).unwrap();
        assert_eq!(out, DOC.replace("old tables", "new tables"));
        assert_eq!(updated(&out, &[(&QUALITY, "new tables".into())]).unwrap(), out, "writing twice changes nothing");
    }

    #[test]
    fn a_missing_section_goes_before_the_next_one_in_order() {
        let out = updated(DOC, &[(&MOE, "moe".into())]).unwrap();
        let moe = out.find("<!-- moe-study: written by `cargo studies moe` -->\nmoe\n<!-- /moe-study -->\n").unwrap();
        assert!(out.find("hand-written note").unwrap() < moe && moe < out.find("<!-- fed-study").unwrap(), "{out}");
        let out = updated(DOC, &[(&ROBUST, "robust".into())]).unwrap();
        assert!(out.ends_with(
            "<!-- /fed-study -->\n\n<!-- robust-study: written by `cargo studies robust` -->\nrobust\n<!-- /robust-study -->\n\n"
        ));
    }

    #[test]
    fn every_section_of_the_repositorys_results_is_marked_and_rewrites_to_itself() {
        let text = include_str!("../../../RESULTS.md");
        let mut sections = Vec::new();
        for section in ORDER.iter().filter(|s| s.id != OTHER_RUNS.id) {
            let (from, to) = find(text, section).unwrap().unwrap_or_else(|| panic!("RESULTS.md has no `{}` section", section.id));
            assert!(text[from..].starts_with(&section.begin()), "`{}`: the begin marker names another command", section.id);
            let body = &text[from + section.begin().len() + 1..to - section.end().len() - 1];
            sections.push((*section, body.to_string()));
        }
        assert_eq!(updated(text, &sections).unwrap(), text);
    }

    #[test]
    fn a_section_with_one_marker_is_refused_with_its_name() {
        let broken = DOC.replace("<!-- /fed-study -->", "");
        let err = updated(&broken, &[(&FED, "x".into())]).unwrap_err().to_string();
        assert!(err.contains("`fed-study`"), "{err}");
    }
}
