//! Crash-safe file operations and the named fault points that prove them.
//!
//! Every writer of the library (adapter folders, checkpoints, run outputs, the adapter
//! library) reaches its files through these calls, and each call passes named fault
//! points right before and after its fsync or rename. A test sets
//! `ADAPTERS_FAULT=NAME[:K]` and the K-th pass (default the first) through the point NAME
//! aborts the process on the spot, as a crash would (no destructor runs, nothing more is
//! written); with `ADAPTERS_FAULT_LOG=FILE` each pass appends the point's name to FILE, so
//! a test can list the points a command goes through and crash it at every one.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The variable naming the fault point to crash at: `NAME` or `NAME:K` (the K-th pass).
pub const FAULT_ENV: &str = "ADAPTERS_FAULT";
/// The variable naming a file to which every fault point passed appends its name.
pub const FAULT_LOG_ENV: &str = "ADAPTERS_FAULT_LOG";

struct Faults {
    crash_at: Option<(String, usize)>,
    log: Option<std::path::PathBuf>,
    passes: Mutex<HashMap<String, usize>>,
}

fn faults() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let crash_at = std::env::var(FAULT_ENV).ok().filter(|v| !v.is_empty()).map(|v| match v.rsplit_once(':') {
            Some((name, k)) if k.parse::<usize>().is_ok() => (name.to_string(), k.parse().expect("checked")),
            _ => (v, 1),
        });
        Faults { crash_at, log: std::env::var_os(FAULT_LOG_ENV).map(Into::into), passes: Mutex::default() }
    })
}

/// A named fault point: crashes the process here when [`FAULT_ENV`] names it (see the
/// module's documentation); otherwise costs a lookup.
pub fn fault_point(name: &str) {
    let f = faults();
    if f.crash_at.is_none() && f.log.is_none() {
        return;
    }
    let pass = {
        let mut passes = f.passes.lock().unwrap_or_else(|e| e.into_inner());
        let n = passes.entry(name.to_string()).or_default();
        *n += 1;
        *n
    };
    if let Some(log) = &f.log {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(file, "{name}");
        }
    }
    if f.crash_at.as_ref().is_some_and(|(at, k)| at == name && *k == pass) {
        eprintln!("{FAULT_ENV}: crashing at {name} (pass {pass})");
        std::process::abort();
    }
}

/// Flushes a written file (or a folder's entries) to the disk, between the fault points
/// `POINT.before_fsync` and `POINT.after_fsync`.
pub fn sync(path: &Path, point: &str) -> std::io::Result<()> {
    fault_point(&format!("{point}.before_fsync"));
    std::fs::File::open(path)?.sync_all()?;
    fault_point(&format!("{point}.after_fsync"));
    Ok(())
}

/// Flushes every file and folder under `dir` (one pair of fault points, `POINT.before_fsync`
/// and `POINT.after_fsync`, for the whole tree).
pub fn sync_tree(dir: &Path, point: &str) -> std::io::Result<()> {
    fn walk(path: &Path) -> std::io::Result<()> {
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path())?;
            }
        }
        std::fs::File::open(path)?.sync_all()
    }
    fault_point(&format!("{point}.before_fsync"));
    walk(dir)?;
    fault_point(&format!("{point}.after_fsync"));
    Ok(())
}

/// Renames `from` to `to` and flushes the folder holding `to`, so the new name survives a
/// power cut; fault points `POINT.before_rename` and `POINT.after_rename` around the rename.
pub fn rename(from: &Path, to: &Path, point: &str) -> std::io::Result<()> {
    fault_point(&format!("{point}.before_rename"));
    std::fs::rename(from, to)?;
    fault_point(&format!("{point}.after_rename"));
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync(parent, &format!("{point}.folder"))?;
    }
    Ok(())
}

/// Replaces the folder `dir` by one `write` fills, so that after a crash at any moment
/// either the old folder or the new one is found (through [`recover_dir`]): the new one is
/// written and flushed beside it, the old one set aside, the new one renamed into place,
/// the old one removed. Fault points: `POINT.aside.*` and `POINT.into_place.*`.
pub fn replace_dir<E: From<std::io::Error>>(dir: &Path, point: &str, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let (tmp, old) = siblings(dir);
    recover_dir(dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    write(&tmp)?;
    sync_tree(&tmp, point)?;
    if dir.exists() {
        rename(dir, &old, &format!("{point}.aside"))?;
    }
    rename(&tmp, dir, &format!("{point}.into_place"))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Finishes what a crash interrupted in [`replace_dir`]: when `dir` is missing and its
/// old copy is still set aside, the old copy goes back; a half-written new one is removed.
pub fn recover_dir(dir: &Path) -> std::io::Result<()> {
    let (tmp, old) = siblings(dir);
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, dir)?;
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// The temporary and set-aside siblings of `dir`: `.NAME.tmp` and `.NAME.old`.
fn siblings(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    (dir.with_file_name(format!(".{name}.tmp")), dir.with_file_name(format!(".{name}.old")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_and_recovery_restores_a_set_aside_folder() {
        let root = std::env::temp_dir().join(format!("adapters-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("out");
        replace_dir::<std::io::Error>(&dir, "test", |tmp| std::fs::write(tmp.join("a"), "1")).unwrap();
        replace_dir::<std::io::Error>(&dir, "test", |tmp| std::fs::write(tmp.join("a"), "2")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
        // A crash between setting the old folder aside and moving the new one in.
        std::fs::rename(&dir, root.join(".out.old")).unwrap();
        std::fs::create_dir_all(root.join(".out.tmp")).unwrap();
        recover_dir(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
        assert!(!root.join(".out.old").exists() && !root.join(".out.tmp").exists());
        // A failing writer leaves the old folder as it was.
        let failed = replace_dir(&dir, "test", |_| Err(std::io::Error::other("no")));
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
