//! A poisoned request, for the tests that prove one request's failure stays its own. With
//! `ADAPTERS_SERVE_FAULT=MODE:MARKER` in the server's environment (read once, at start),
//! a batched forward pass (embeddings, classification) or decoding step (generations,
//! after their prompts ran) that holds a row whose text contains MARKER fails as a real
//! fault would, inside the batch: `error` returns an error, `panic` panics; `loop` panics
//! the decoding loop itself, outside its per-step guard, as a bug in the loop would.
//! Unset, it costs one branch per batch.

use std::sync::OnceLock;

/// The variable that arms the fault.
pub const FAULT_ENV: &str = "ADAPTERS_SERVE_FAULT";

/// How a poisoned batch fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Error,
    Panic,
    Loop,
}

struct Armed {
    mode: Mode,
    marker: String,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAULT_ENV).ok()?;
            let (mode, marker) = spec.split_once(':')?;
            let mode = match mode {
                "error" => Mode::Error,
                "panic" => Mode::Panic,
                "loop" => Mode::Loop,
                _ => return None,
            };
            (!marker.is_empty()).then(|| Armed { mode, marker: marker.to_string() })
        })
        .as_ref()
}

/// Arms the fault now, so that it is read before the first request.
pub(crate) fn init() {
    if let Some(a) = armed() {
        tracing::warn!(mode = ?a.mode, marker = %a.marker, "{FAULT_ENV} is set: batches holding the marker will fail on purpose");
    }
}

/// Fails (in `mode`) when any of `rows` holds the marker.
pub(crate) fn check<'a>(mode: Mode, mut rows: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let Some(a) = armed().filter(|a| a.mode == mode) else { return Ok(()) };
    if !rows.any(|r| r.contains(&a.marker)) {
        return Ok(());
    }
    match mode {
        Mode::Error => Err(format!("{FAULT_ENV}: a poisoned row failed this batch")),
        Mode::Panic | Mode::Loop => panic!("{FAULT_ENV}: a poisoned row panicked this batch"),
    }
}

/// Panics (as a bug in the decoding loop would) when `text` holds the marker of `loop`.
pub(crate) fn panic_if_loop_poisoned(text: &str) {
    let _ = check(Mode::Loop, std::iter::once(text));
}

/// Both in-batch modes at once: what a batched pass calls.
pub(crate) fn check_batch<'a>(rows: impl Iterator<Item = &'a str> + Clone) -> Result<(), String> {
    check(Mode::Panic, rows.clone())?;
    check(Mode::Error, rows)
}
