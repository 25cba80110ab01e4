//! all-MiniLM-L6-v2 against the PyTorch reference outputs in fixtures/golden/minilm.json,
//! and against candle-transformers' own BertModel.

mod common;

use adapters_core::ForwardCtx;
use adapters_models::heads::{l2_normalize, mean_pool};
use adapters_models::{load, Backbone, Bert, TextTokenizer};
use candle_core::{Device, Tensor};
use common::*;

fn model() -> (Bert, TextTokenizer) {
    let loaded = load(&minilm(), &Device::Cpu).unwrap();
    match loaded.backbone {
        Backbone::Bert(b) => (b, loaded.tokenizer),
        _ => panic!("MiniLM should load as BERT"),
    }
}

fn embed(bert: &Bert, ids: &[Vec<u32>], mask: &[Vec<u32>], ctx: &ForwardCtx) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let ids = Tensor::new(ids.to_vec(), &dev).unwrap();
    let mask = Tensor::new(mask.to_vec(), &dev).unwrap();
    let hidden = bert.forward(&ids, None, Some(&mask), ctx).unwrap();
    l2_normalize(&mean_pool(&hidden, &mask).unwrap()).unwrap().to_vec2().unwrap()
}

#[test]
fn token_ids_match_the_reference_tokenizer() {
    let (_, tok) = model();
    let golden = fixture("golden/minilm.json");
    for s in golden["sentences"].as_array().unwrap() {
        let got = tok.encode(s["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(got, ids(&s["input_ids"]), "text {:?}", s["text"]);
    }
}

#[test]
fn embeddings_match_within_1e_4_one_by_one_and_padded() {
    let (bert, tok) = model();
    let golden = fixture("golden/minilm.json");
    let sentences = golden["sentences"].as_array().unwrap();
    for s in sentences {
        let got = embed(&bert, &[ids(&s["input_ids"])], &[ids(&s["attention_mask"])], &ForwardCtx::inference());
        let d = max_abs_diff(&got[0], &floats(&s["embedding"]));
        assert!(d <= 1e-4, "{:?}: max abs diff {d}", s["text"]);
    }
    // All six in one padded batch, through the tokenizer.
    let texts: Vec<&str> = sentences.iter().map(|s| s["text"].as_str().unwrap()).collect();
    let batch = tok.encode_batch(&texts).unwrap();
    let got = embed(&bert, &batch.ids, &batch.attention_mask, &ForwardCtx::inference());
    for (g, s) in got.iter().zip(sentences) {
        let d = max_abs_diff(g, &floats(&s["embedding"]));
        assert!(d <= 1e-4, "padded {:?}: max abs diff {d}", s["text"]);
    }
}

/// `sentence_embeddings` runs texts sorted by length in token-budget batches: the golden
/// vectors come back in the texts' order, whatever the batches.
#[test]
fn sentence_embeddings_batch_by_length_and_keep_the_order() {
    let loaded = load(&minilm(), &Device::Cpu).unwrap();
    let golden = fixture("golden/minilm.json");
    let sentences = golden["sentences"].as_array().unwrap();
    let texts: Vec<String> = sentences.iter().map(|s| s["text"].as_str().unwrap().to_string()).collect();
    let embed =
        |texts: &[String], budget| adapters_models::sentence_embeddings(&loaded.backbone, &loaded.tokenizer, texts, budget).unwrap().0;
    // One batch (the default budget), one text per batch, and batches of a few texts.
    for budget in [adapters_models::MAX_BATCH_TOKENS, 1, 40] {
        for (g, s) in embed(&texts, budget).iter().zip(sentences) {
            let d = max_abs_diff(g, &floats(&s["embedding"]));
            assert!(d <= 1e-4, "budget {budget}, {:?}: max abs diff {d}", s["text"]);
        }
    }
}

#[test]
fn last_hidden_state_matches_within_1e_3_and_training_path_agrees() {
    let (bert, _) = model();
    let golden = fixture("golden/minilm.json");
    let s = &golden["sentences"][0];
    let ids = Tensor::new(vec![ids(&s["input_ids"])], &Device::Cpu).unwrap();
    let want: Vec<f32> = golden["last_hidden_state_sentence0"]["values"].as_array().unwrap().iter().flat_map(floats).collect();
    let got = bert.forward(&ids, None, None, &ForwardCtx::inference()).unwrap();
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&got, &want) <= 1e-3);
    let train = bert.forward(&ids, None, None, &ForwardCtx::training()).unwrap();
    let train: Vec<f32> = train.flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&got, &train) <= 1e-4, "training path differs: {}", max_abs_diff(&got, &train));
}

#[test]
fn agrees_with_candle_transformers_bert() {
    use candle_transformers::models::bert as ct;
    let dev = Device::Cpu;
    let dir = minilm();
    let config: ct::Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], candle_core::DType::F32, &dev).unwrap() };
    let reference = ct::BertModel::load(vb, &config).unwrap();
    let (bert, tok) = model();
    let batch = tok.encode_batch(&["Adapters are small.", "A frozen model with clip-on tools, one per task."]).unwrap();
    let ids = Tensor::new(batch.ids.clone(), &dev).unwrap();
    let types = ids.zeros_like().unwrap();
    let mask = Tensor::new(batch.attention_mask.clone(), &dev).unwrap();
    let want = reference.forward(&ids, &types, Some(&mask)).unwrap();
    let got = bert.forward(&ids, None, Some(&mask), &ForwardCtx::inference()).unwrap();
    let d = (want - got).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "max abs diff to candle-transformers: {d}");
}
