//! AdapterHub 1.3.0 `seq_bn` adapters on the random-weight models of the architectures
//! AdapterHub supports (fixtures/architectures/*/adapterhub_seq_bn: Llama 3, Mistral,
//! RoBERTa, XLM-R, DistilBERT) reproduce AdapterHub's outputs.

use adapters_models::HoldsAdapters;
use adapters_testkit::architectures::{folder, max_relative_error, model, tensors};

#[test]
fn adapterhub_seq_bn_reproduces_adapterhub_on_its_architectures() {
    let _ = adapters_bottleneck::family();
    for name in ["llama3", "mistral", "roberta", "xlm-roberta", "distilbert"] {
        let dir = folder(name).join("adapterhub_seq_bn");
        // Decoders: AdapterHub's base model gives the final hidden states, not logits.
        let expected = tensors(&dir.join("expected.safetensors"));
        let mut m = model(name);
        let base = max_relative_error(&m, name, &expected);
        assert!(base > 1e-2, "{name}: the fixture's adapter should change the outputs (base differs by {base})");
        let adapter = m.load_adapter(&dir, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        m.adapters_mut().activate(&[&adapter]).unwrap();
        let err = max_relative_error(&m, name, &expected);
        assert!(err <= 1e-4, "{name}: AdapterHub seq_bn outputs off by {err:.2e}");
    }
}
