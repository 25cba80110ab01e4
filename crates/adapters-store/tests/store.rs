//! The adapter library on a local folder and on a real S3-compatible server (s3s-fs,
//! started on 127.0.0.1 by the test), with the repository's adapter fixtures.

use adapters_store::{Error, Name, PushOptions, Reference, Store};
use adapters_testkit::{s3_options, start_s3};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    adapters_testkit::register_all();
    let dir = std::env::temp_dir().join(format!("adapters-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn copy_dir(from: &Path, to: &Path) {
    adapters_core::io::copy_dir(from, to).unwrap();
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

fn same_files(a: &Path, b: &Path) {
    for e in std::fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            same_files(&e.path(), &b.join(e.file_name()));
        } else {
            assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(b.join(e.file_name())).unwrap(), "{}", e.path().display());
        }
    }
}

/// Push, resolve, pull, tag, remove and list: the same on every backend.
async fn round_trip(store: &Store, work: &Path) {
    let sms = fixtures().join("fusion-sources/sms_spam");
    let trec = fixtures().join("fusion-sources/trec_coarse");
    let first = store
        .push(
            &sms,
            &name("classifier"),
            PushOptions { tags: vec![name("prod")], training_run: Some("runs/sms".into()), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!((first.contents.format.as_str(), first.contents.kind.as_str()), ("adapters-rs", "seq_bn"));
    assert!(first.contents.base_model.is_some() && first.contents.parameters > 100_000, "{first:?}");
    assert_eq!(first.version.len(), 16);
    assert_eq!(first.training_run.as_deref(), Some("runs/sms"));
    assert!(first.files.iter().any(|f| f.path == "heads/sms_spam/head.safetensors"), "{:?}", first.files);
    // The same folder again: the same version, nothing new.
    let again = store.push(&sms, &name("classifier"), PushOptions::default()).await.unwrap();
    assert_eq!((again.version.as_str(), again.created.as_str()), (first.version.as_str(), first.created.as_str()));
    // Another folder: a new version that `latest` follows and `prod` does not.
    let second = store.push(&trec, &name("classifier"), PushOptions { tags: vec![name("canary")], ..Default::default() }).await.unwrap();
    assert_ne!(second.version, first.version);
    assert_eq!(store.resolve(&reference("classifier")).await.unwrap().version, second.version);
    assert_eq!(store.resolve(&reference("classifier@prod")).await.unwrap().version, first.version);
    assert_eq!(store.resolve(&reference(&format!("classifier@{}", &first.version[..6]))).await.unwrap().version, first.version);
    let missing = store.resolve(&reference("classifier@nope")).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)) && missing.to_string().contains("canary"), "{missing}");

    // Pull: the files come back as pushed; an occupied folder is refused.
    let out = work.join("pulled");
    let pulled = store.pull(&reference("classifier@prod"), &out).await.unwrap();
    assert_eq!(pulled, first);
    same_files(&sms, &out);
    assert!(store.pull(&reference("classifier@prod"), &out).await.unwrap_err().to_string().contains("not empty"));

    // Tags move; a tagged version is not removed without --force.
    store.tag(&reference("classifier@canary"), &name("prod")).await.unwrap();
    assert_eq!(store.resolve(&reference("classifier@prod")).await.unwrap().version, second.version);
    store.untag(&name("classifier"), &name("canary")).await.unwrap();
    assert!(store.untag(&name("classifier"), &name("canary")).await.is_err());
    let listing = store.list(None).await.unwrap();
    assert_eq!(listing.len(), 1);
    let tags: Vec<Vec<String>> = listing[0].versions.iter().map(|v| v.tags.clone()).collect();
    assert!(tags.contains(&vec!["latest".to_string(), "prod".to_string()]) && tags.contains(&vec![]), "{tags:?}");
    let refused = store.remove(&reference("classifier@prod"), false).await.unwrap_err();
    assert!(refused.to_string().contains("--force"), "{refused}");
    store.remove(&reference(&format!("classifier@{}", first.version)), false).await.unwrap();
    assert!(matches!(store.resolve(&reference(&format!("classifier@{}", first.version))).await, Err(Error::NotFound(_))));
    store.remove(&reference("classifier"), true).await.unwrap();
    assert!(matches!(store.resolve(&reference("classifier")).await, Err(Error::NotFound(_))));
    assert!(store.list(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_local_store_keeps_versions_tags_and_files() {
    let dir = scratch("local");
    let store = Store::open(dir.0.join("store").to_str().unwrap()).unwrap();
    round_trip(&store, &dir.0).await;
}

#[tokio::test]
async fn an_s3_store_keeps_versions_tags_and_files() {
    let dir = scratch("s3");
    let endpoint = start_s3(&dir.0.join("s3")).await;
    let options = s3_options(&endpoint);
    let store = Store::open_with_options("s3://adapters/team-a", &options).unwrap();
    round_trip(&store, &dir.0).await;
    // A wrong secret is an error from the server, named with the store.
    let mut wrong = options;
    wrong[3] = ("aws_secret_access_key", "wrong");
    let bad = Store::open_with_options("s3://adapters", &wrong).unwrap();
    let e = bad.list(None).await.unwrap_err();
    assert!(matches!(e, Error::Backend { .. }) && e.to_string().contains("s3://adapters"), "{e}");
}

#[tokio::test]
async fn setups_are_stored_with_their_adapters() {
    let dir = scratch("setup");
    let bundle = dir.0.join("bundle");
    for member in ["sms_spam", "trec_coarse"] {
        copy_dir(&fixtures().join("fusion-sources").join(member), &bundle.join(member));
    }
    std::fs::write(
        bundle.join("adapter_setup.json"),
        r#"{"block": "stack", "children": [{"block": "adapter", "name": "sms_spam"}, {"block": "adapter", "name": "trec_coarse"}]}"#,
    )
    .unwrap();
    let store = Store::open(dir.0.join("store").to_str().unwrap()).unwrap();
    let m = store.push(&bundle, &name("both"), PushOptions::default()).await.unwrap();
    assert_eq!(m.contents.kind, "setup");
    let setup = m.contents.setup.as_ref().unwrap();
    assert_eq!(setup.expression, "stack(sms_spam, trec_coarse)");
    assert_eq!(setup.adapters, vec![("sms_spam".to_string(), "seq_bn".to_string()), ("trec_coarse".to_string(), "seq_bn".to_string())]);
    store.pull(&reference("both"), &dir.0.join("out")).await.unwrap();
    same_files(&bundle, &dir.0.join("out"));
    // A setup naming an adapter it does not carry is refused.
    std::fs::remove_dir_all(bundle.join("trec_coarse")).unwrap();
    let e = store.push(&bundle, &name("broken"), PushOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("no subfolder `trec_coarse`"), "{e}");
}

#[tokio::test]
async fn malformed_folders_and_names_are_refused_before_anything_is_stored() {
    let dir = scratch("bad");
    let store = Store::open(dir.0.join("store").to_str().unwrap()).unwrap();
    let good = dir.0.join("good");
    copy_dir(&fixtures().join("fusion-sources/sms_spam"), &good);
    let refused = |e: Error, what: &str| assert!(e.to_string().contains(what), "expected `{what}` in: {e}");

    refused(store.push(&dir.0.join("nowhere"), &name("x"), PushOptions::default()).await.unwrap_err(), "is not a folder");
    let empty = dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(store.push(&empty, &name("x"), PushOptions::default()).await.unwrap_err(), "adapter_config.json");
    for bad in ["../escape", "a/b", ".."] {
        refused(bad.parse::<Name>().unwrap_err(), "not a valid name");
    }

    let unknown = dir.0.join("unknown");
    copy_dir(&good, &unknown);
    let config = std::fs::read_to_string(unknown.join("adapter_config.json")).unwrap().replace("\"seq_bn\"", "\"no_such_kind\"");
    std::fs::write(unknown.join("adapter_config.json"), config).unwrap();
    refused(store.push(&unknown, &name("x"), PushOptions::default()).await.unwrap_err(), "no_such_kind");

    let foreign = dir.0.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("adapter_config.json"), r#"{"some": "other tool"}"#).unwrap();
    refused(store.push(&foreign, &name("x"), PushOptions::default()).await.unwrap_err(), "not an adapter config of a known format");

    let truncated = dir.0.join("truncated");
    copy_dir(&good, &truncated);
    let weights = truncated.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    refused(store.push(&truncated, &name("x"), PushOptions::default()).await.unwrap_err(), "truncated");
    assert!(store.list(None).await.unwrap().is_empty(), "nothing was stored");

    // Other libraries' folders are stored with their kind.
    let peft = store.push(&fixtures().join("interop/peft_lora_minilm/adapter"), &name("peft"), PushOptions::default()).await.unwrap();
    assert_eq!((peft.contents.format.as_str(), peft.contents.kind.as_str(), peft.contents.base_model.is_none()), ("peft", "lora", true));
}

#[tokio::test]
async fn damaged_or_unfinished_versions_are_never_served() {
    let dir = scratch("damaged");
    let root = dir.0.join("store");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    let m = store.push(&fixtures().join("fusion-sources/sms_spam"), &name("sms"), PushOptions::default()).await.unwrap();
    // A file truncated in the store: the pull fails and leaves no folder behind.
    let stored = root.join(format!("sms/versions/{}/files/adapter_model.safetensors", m.version));
    let bytes = std::fs::read(&stored).unwrap();
    std::fs::write(&stored, &bytes[..100]).unwrap();
    let out = dir.0.join("out");
    let e = store.pull(&reference("sms"), &out).await.unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("damaged"), "{e}");
    assert!(!out.exists() && std::fs::read_dir(&dir.0).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("partial")));
    // A push that stopped before its manifest: its files are there, the version is not.
    let unfinished = root.join("sms/versions/0123456789abcdef/files");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("adapter_config.json"), b"{}").unwrap();
    let listed = store.list(Some(&name("sms"))).await.unwrap();
    assert_eq!(listed[0].versions.len(), 1);
    assert!(matches!(store.resolve(&reference("sms@0123456789abcdef")).await, Err(Error::NotFound(_))));
}

/// Writes objects into a store behind its back, as an attacker with write access to the
/// bucket (or a buggy tool) would.
type Raw = std::sync::Arc<dyn object_store::ObjectStore>;

async fn put_raw(raw: &Raw, path: &str, body: String) {
    object_store::ObjectStoreExt::put(raw.as_ref(), &object_store::path::Path::from(path), body.into_bytes().into()).await.unwrap();
}

/// Malicious tags and manifests are refused when read, name the adapter and never become
/// paths; tags that look like versions are refused when written.
async fn hostile_store(store: &Store, raw: &Raw, work: &Path) {
    let sms = fixtures().join("fusion-sources/sms_spam");
    let good = store.push(&sms, &name("sms"), PushOptions::default()).await.unwrap();
    let cache = work.join("cache");
    let corrupt = |e: Error, needle: &str| {
        assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains(needle), "expected Corrupt with `{needle}`: {e}")
    };
    // Tags pointing outside: a relative escape, an absolute path, upper-case hex.
    for (tag, version) in [("up", "../../../../outside"), ("abs", "/absolute/version"), ("upper", "0123456789ABCDEF")] {
        put_raw(raw, &format!("sms/tags/{tag}.json"), format!(r#"{{"version": "{version}", "updated": "2026-01-01T00:00:00Z"}}"#)).await;
        corrupt(store.resolve(&reference(&format!("sms@{tag}"))).await.unwrap_err(), "not a version");
    }
    // Listing reads every tag, so it refuses the store's bad tags too rather than skipping them.
    corrupt(store.list(Some(&name("sms"))).await.unwrap_err(), "not a version");
    for tag in ["up", "abs", "upper"] {
        object_store::ObjectStoreExt::delete(raw.as_ref(), &object_store::path::Path::from(format!("sms/tags/{tag}.json"))).await.unwrap();
    }
    // Manifests whose digests match their (hostile) file lists: files outside the folder, a
    // setup member with a path in it, a version that is not one.
    let file = |path: &str| adapters_store::FileEntry { path: path.into(), size: 1, sha256: "00".repeat(32) };
    let mut forged = good.clone();
    for (files, member, needle) in [
        (vec![file("../../outside")], None, "outside the folder"),
        (vec![file("/absolute/file")], None, "outside the folder"),
        (vec![file("a\\..\\..\\x")], None, "outside the folder"),
        (vec![file("adapter_config.json")], Some("../../outside"), "not a plain name"),
    ] {
        forged.files = files;
        forged.digest = adapters_store::folder::digest(&forged.files);
        forged.version = forged.digest[..16].to_string();
        forged.contents.setup =
            member.map(|m| adapters_store::SetupContents { expression: m.into(), adapters: vec![(m.into(), "seq_bn".into())] });
        put_raw(raw, &format!("sms/versions/{}/manifest.json", forged.version), serde_json::to_string(&forged).unwrap()).await;
        corrupt(store.resolve(&reference(&format!("sms@{}", forged.version))).await.unwrap_err(), needle);
        object_store::ObjectStoreExt::delete(
            raw.as_ref(),
            &object_store::path::Path::from(format!("sms/versions/{}/manifest.json", forged.version)),
        )
        .await
        .unwrap();
    }
    // A manifest whose version is not the start of its digest.
    let mut lying = good.clone();
    lying.version = "0123456789abcdef".into();
    put_raw(raw, "sms/versions/0123456789abcdef/manifest.json", serde_json::to_string(&lying).unwrap()).await;
    corrupt(store.resolve(&reference("sms@0123456789abcdef")).await.unwrap_err(), "do not match");
    object_store::ObjectStoreExt::delete(raw.as_ref(), &object_store::path::Path::from("sms/versions/0123456789abcdef/manifest.json"))
        .await
        .unwrap();
    // A manifest made up in memory never reaches a path either.
    let mut made_up = good.clone();
    made_up.version = "../../escaped".into();
    corrupt(store.cached(&made_up, &cache).await.unwrap_err(), "not a version");
    assert!(!work.join("escaped").exists());

    // Tags that read as versions are refused at tag and push, before anything is stored.
    for hexlike in ["beef", "0123abcd", &good.version[..6]] {
        let e = store.tag(&reference("sms"), &name(hexlike)).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("could be read as a version"), "{e}");
        let e = store.push(&sms, &name("other"), PushOptions { tags: vec![name(hexlike)], ..Default::default() }).await.unwrap_err();
        assert!(e.to_string().contains("could be read as a version"), "{e}");
    }
    assert!(store.list(Some(&name("other"))).await.is_err(), "nothing was pushed");
    // A tag written before that rule, named like the start of a version, does not shadow it.
    let other = store.push(&fixtures().join("fusion-sources/trec_coarse"), &name("sms"), PushOptions::default()).await.unwrap();
    let prefix = &good.version[..6];
    put_raw(raw, &format!("sms/tags/{prefix}.json"), format!(r#"{{"version": "{}", "updated": "2026-01-01T00:00:00Z"}}"#, other.version))
        .await;
    assert_eq!(store.resolve(&reference(&format!("sms@{prefix}"))).await.unwrap().version, good.version);
    assert_eq!(store.resolve(&reference(&format!("sms@{}", good.version))).await.unwrap().version, good.version);
}

#[tokio::test]
async fn a_hostile_local_store_is_refused_and_never_becomes_a_path() {
    let dir = scratch("hostile-local");
    let root = dir.0.join("store");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    let raw: Raw = std::sync::Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap());
    hostile_store(&store, &raw, &dir.0).await;
}

#[tokio::test]
async fn a_hostile_s3_store_is_refused_and_never_becomes_a_path() {
    let dir = scratch("hostile-s3");
    let endpoint = start_s3(&dir.0.join("s3")).await;
    let options = s3_options(&endpoint);
    let store = Store::open_with_options("s3://adapters/team-a", &options).unwrap();
    let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name("adapters");
    for (key, value) in options {
        builder = builder.with_config(key.parse().unwrap(), value);
    }
    let raw: Raw = std::sync::Arc::new(object_store::prefix::PrefixStore::new(builder.build().unwrap(), "team-a"));
    hostile_store(&store, &raw, &dir.0).await;
}

#[tokio::test]
async fn a_tampered_cached_copy_is_detected_and_fetched_again() {
    let dir = scratch("tampered-cache");
    let store = Store::open(dir.0.join("store").to_str().unwrap()).unwrap();
    let m = store.push(&fixtures().join("fusion-sources/sms_spam"), &name("sms"), PushOptions::default()).await.unwrap();
    let cache = dir.0.join("cache");
    let copy = store.cached(&m, &cache).await.unwrap();
    assert_eq!(copy, cache.join("sms").join(&m.version));
    same_files(&fixtures().join("fusion-sources/sms_spam"), &copy);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for folder in [&cache, &cache.join("sms"), &copy] {
            assert_eq!(std::fs::metadata(folder).unwrap().permissions().mode() & 0o777, 0o700, "{}", folder.display());
        }
    }
    // One byte changed, in place and with the same size.
    let weights = copy.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&weights, &bytes).unwrap();
    assert_eq!(store.cached(&m, &cache).await.unwrap(), copy);
    same_files(&fixtures().join("fusion-sources/sms_spam"), &copy);
    // A file slipped in beside the version's own.
    std::fs::write(copy.join("extra.safetensors"), b"not ours").unwrap();
    store.cached(&m, &cache).await.unwrap();
    assert!(!copy.join("extra.safetensors").exists());
    same_files(&fixtures().join("fusion-sources/sms_spam"), &copy);
    // Nothing is left beside it.
    let names: Vec<String> =
        std::fs::read_dir(cache.join("sms")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![m.version.clone()]);
}

/// Set by the test below for the two processes it starts.
const RACE_ENV: &str = "ADAPTERS_STORE_CACHE_RACE";
const RACE_ROUNDS: usize = 50;

#[tokio::test]
async fn two_processes_pull_one_version_into_one_cache_concurrently() {
    let dir = scratch("cache-race");
    let store = Store::open(dir.0.join("store").to_str().unwrap()).unwrap();
    store.push(&fixtures().join("fusion-sources/sms_spam"), &name("sms"), PushOptions::default()).await.unwrap();
    // Two processes (this test binary again, running `cache_race_process`), each pulling
    // sms into the same 50 fresh caches in the same order: they race on every one.
    let start = |who: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cache_race_process", "--ignored", "--nocapture", "--test-threads=1"])
            .env(RACE_ENV, &dir.0)
            .env("RACE_WHO", who)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("a"), start("b"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains(&format!("{RACE_ROUNDS} rounds whole")), "{text}");
    }
    for round in 0..RACE_ROUNDS {
        let sms = dir.0.join(format!("cache-{round}/sms"));
        let entries: Vec<_> = std::fs::read_dir(&sms).unwrap().collect();
        assert_eq!(entries.len(), 1, "round {round}: leftovers beside the version");
        same_files(&fixtures().join("fusion-sources/sms_spam"), &entries[0].as_ref().unwrap().path());
    }
}

/// One side of the race above; does nothing unless that test started it.
#[tokio::test]
#[ignore = "started by two_processes_pull_one_version_into_one_cache_concurrently"]
async fn cache_race_process() {
    let Some(dir) = std::env::var_os(RACE_ENV).map(PathBuf::from) else { return };
    let store = Store::open(dir.join("store").to_str().unwrap()).unwrap();
    let m = store.resolve(&reference("sms")).await.unwrap();
    for round in 0..RACE_ROUNDS {
        let copy = store.cached(&m, &dir.join(format!("cache-{round}"))).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        same_files(&fixtures().join("fusion-sources/sms_spam"), &copy);
    }
    println!("{RACE_ROUNDS} rounds whole");
}
