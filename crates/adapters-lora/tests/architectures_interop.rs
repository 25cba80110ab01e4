//! PEFT 0.21.2 LoRA folders on the random-weight model of every supported architecture
//! (fixtures/architectures/*/peft_lora: every projection, Phi-3's fused `qkv_proj` and
//! `gate_up_proj` included, RoBERTa's and XLM-R's pooler too) reproduce PEFT's outputs,
//! and a merged LoRA equals the unmerged one.

use adapters_models::HoldsAdapters;
use adapters_testkit::architectures::{folder, max_relative_error, model, tensors, DECODERS, ENCODERS};

#[test]
fn peft_lora_reproduces_peft_on_every_architecture() {
    let _ = adapters_lora::family();
    for name in DECODERS.into_iter().chain(ENCODERS) {
        let dir = folder(name).join("peft_lora");
        let expected = tensors(&dir.join("expected.safetensors"));
        let mut m = model(name);
        let base = max_relative_error(&m, name, &expected);
        assert!(base > 1e-2, "{name}: the fixture's LoRA should change the outputs (base differs by {base})");
        let lora = m.load_adapter(&dir, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        m.adapters_mut().activate(&[&lora]).unwrap();
        let err = max_relative_error(&m, name, &expected);
        assert!(err <= 1e-4, "{name}: PEFT LoRA outputs off by {err:.2e}");
        m.merge(&lora).unwrap_or_else(|e| panic!("{name}: merge: {e}"));
        let err = max_relative_error(&m, name, &expected);
        assert!(err <= 1e-4, "{name}: merged PEFT LoRA outputs off by {err:.2e}");
    }
}
