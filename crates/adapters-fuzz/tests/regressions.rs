//! What fuzzing found, kept as tests: each input a fuzz target crashed on (or that
//! allocated what it asked for) is refused with an error naming the file and the value.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adapters-fuzz-regressions-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A one-layer Llama GGUF (hidden 8) with `heads` heads, `context` positions and the
/// attention-norm tensor of shape `norm`.
fn gguf(heads: u32, context: u32, norm: &[usize]) -> Vec<u8> {
    use gguf_file::Value;
    let t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        QTensor::quantize(&Tensor::from_vec(vec![0.01f32; n], shape, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![("token_embd.weight".into(), t(&[6, 8])), ("output_norm.weight".into(), t(&[8]))];
    for (name, shape) in [
        ("attn_q", vec![8, 8]),
        ("attn_k", vec![8, 8]),
        ("attn_v", vec![8, 8]),
        ("attn_output", vec![8, 8]),
        ("ffn_norm", vec![8]),
        ("ffn_gate", vec![16, 8]),
        ("ffn_up", vec![16, 8]),
        ("ffn_down", vec![8, 16]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), t(&shape)));
    }
    tensors.push(("blk.0.attn_norm.weight".into(), t(norm)));
    let tokens = Value::Array(["a", "b", "ab", "c", "d", "e"].iter().map(|s| Value::String(s.to_string())).collect());
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(context)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())])),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

fn load_error(bytes: Vec<u8>) -> String {
    let dir = scratch("gguf");
    let file = dir.join("model.gguf");
    std::fs::write(&file, bytes).unwrap();
    let e = adapters_models::load(&file, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    e
}

#[test]
fn gguf_files_with_impossible_numbers_are_refused() {
    assert_eq!(load_error(gguf(2, 32, &[8])), "", "the well-formed file loads");
    // Dimensions whose product overflows (found as "attempt to multiply with overflow").
    let mut overflow = gguf(2, 32, &[8]);
    let at = overflow.windows(22).position(|w| w == b"blk.0.attn_norm.weight").unwrap() + 22 + 4;
    overflow[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = load_error(overflow);
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("impossible shape"), "{e}");
    // An empty tensor (candle read it through a misaligned pointer).
    let e = load_error(gguf(2, 32, &[0]));
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("impossible shape"), "{e}");
    // No attention heads (a division by zero).
    let e = load_error(gguf(0, 32, &[8]));
    assert!(e.contains("num_attention_heads 0"), "{e}");
    // A context of 2^28 positions (2 GB of rotary tables, 15 s) is refused up front.
    let e = load_error(gguf(2, 1 << 28, &[8]));
    assert!(e.contains("context length of 268435456"), "{e}");
}

fn families() {
    adapters_testkit::register_all();
}

/// Absurd sizes in a config are refused before anything is allocated.
#[test]
fn absurd_adapter_sizes_are_refused_before_allocating() {
    families();
    let model = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap();
    let info = adapters_core::InsertionPoint::model_info(&model.backbone);
    let placement = adapters_core::Placement::default();
    for (kind, config, field) in [
        ("lora", serde_json::json!({"r": 1_000_000_000u64}), "r (or rank_pattern"),
        ("seq_bn", serde_json::json!({"reduction_factor": 1e-9}), "reduction_factor"),
        ("moe_lora", serde_json::json!({"experts": 4, "r": 60000}), "r (or placement.sizes)"),
        ("moe_bn", serde_json::json!({"experts": 4, "reduction_factor": 1e-7}), "reduction_factor"),
    ] {
        let e = adapters_core::registry::build(kind, &config, &placement, &info, &Device::Cpu, 0).err().map(|e| e.to_string());
        let e = e.unwrap_or_else(|| panic!("{kind} {config} was built"));
        assert!(e.contains(field) && e.contains("nothing was allocated"), "{kind}: {e}");
    }
}

/// An adapter folder whose weights hold NaN or infinite values is refused, naming the tensor.
#[test]
fn adapter_weights_with_nan_or_inf_are_refused_naming_the_tensor() {
    families();
    let model = adapters_models::load(&adapters_models::fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap();
    let dir = scratch("nan");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fusion-sources/sms_spam");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(source.join(f), dir.join(f)).unwrap();
    }
    let weights = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = tensors.keys().min().unwrap().clone();
    for bad in [f32::NAN, f32::INFINITY] {
        let t = &tensors[&name];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = bad;
        tensors.insert(name.clone(), Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
        candle_core::safetensors::save(&tensors, &weights).unwrap();
        let e = adapters_core::io::load(&dir, &model.backbone, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("tensor `{name}` holds 1 NaN or infinite values")) && e.contains("adapter_model.safetensors"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
