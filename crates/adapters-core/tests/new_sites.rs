//! The sites for the families to come, each tested with a toy kind on both real backbones
//! (MiniLM and SmolLM2): virtual tokens at the input embeddings (prompt tuning), key/value
//! prefixes (prefix tuning, per row and with the decoder's KV cache), the LM-head input
//! (invertible adapters' inverse) and position-selective interventions at layer outputs
//! (ReFT). Where an exact answer exists it is checked; elsewhere, equivalences that would
//! fail if masks, positions or caches were wrong.

use adapters_core::intervention::{at_positions, edge_positions, row_lengths};
use adapters_core::{Adapter, EmbeddingIo, ForwardCtx, InsertionPoint, InterventionIo, KeyValuePrefix, Point, Site, SiteKind};
use adapters_models::{Backbone, HoldsAdapters, LoadedModel};
use adapters_testkit::max_diff;
use candle_core::{Device, IndexOp, Result, Tensor, Var};

/// A fetched model; a decoder without its 8-bit decoding copies, so that a decoding step
/// computes exactly what a whole forward computes.
fn load(name: &str) -> LoadedModel {
    let mut model = adapters_models::load(&adapters_models::fetched(name).expect("run `cargo xtask fetch` first"), &Device::Cpu).unwrap();
    if let Backbone::Llama(m) = &mut model.backbone {
        m.dequantize();
    }
    model
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-1.0f32..1.0) * std as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The token-embedding table of a backbone.
fn word_embeddings(model: &LoadedModel) -> Tensor {
    let name = if model.backbone.is_encoder() { "embeddings.word_embeddings.weight" } else { "model.embed_tokens.weight" };
    model.backbone.named_weights().into_iter().find(|(n, _)| n == name).map(|(_, t)| t).expect("the embedding table")
}

/// Prompt tuning's form: fixed vectors prepended to every row's token embeddings.
struct Prompt(Tensor);

impl Adapter for Prompt {
    fn kind(&self) -> &str {
        "toy_prompt"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        vec![Point::new(0, Site::InputEmbeddings)]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn forward_embeddings(&self, _: Point, io: &EmbeddingIo, _: &ForwardCtx) -> Result<Tensor> {
        let rows = io.embeddings.dim(0)?;
        Tensor::cat(&[&self.0.unsqueeze(0)?.repeat((rows, 1, 1))?, io.embeddings], 1)
    }
}

/// Prefix tuning's form: learned keys and values at every layer.
struct Prefix {
    layers: usize,
    keys: Var,
    values: Var,
}

impl Prefix {
    fn new(layers: usize, len: usize, width: usize, seed: u64) -> Self {
        let var = |s| Var::from_tensor(&randn(&[len, width], 1.0, s)).unwrap();
        Prefix { layers, keys: var(seed), values: var(seed + 1) }
    }
}

impl Adapter for Prefix {
    fn kind(&self) -> &str {
        "toy_prefix"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        (0..self.layers).map(|l| Point::new(l, Site::KeyValuePrefix)).collect()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        vec![("keys".into(), self.keys.clone()), ("values".into(), self.values.clone())]
    }
    fn key_value_prefix(&self, _: Point, rows: usize, _: &ForwardCtx) -> Result<Option<KeyValuePrefix>> {
        let each = |v: &Var| v.as_tensor().unsqueeze(0)?.repeat((rows, 1, 1));
        Ok(Some(KeyValuePrefix { keys: each(&self.keys)?, values: each(&self.values)? }))
    }
}

/// ReFT's form: a learned vector added to the first and last token of every row, at the
/// output of one layer.
struct Nudge {
    point: Point,
    delta: Tensor,
}

impl Adapter for Nudge {
    fn kind(&self) -> &str {
        "toy_nudge"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        vec![self.point]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn forward_intervention(&self, _: Point, io: &InterventionIo, _: &ForwardCtx) -> Result<Tensor> {
        let (b, s, _) = io.hidden.dims3()?;
        let positions = edge_positions(&row_lengths(io.mask, b, s)?, 1, 1);
        at_positions(io.hidden, &positions, |x| x.broadcast_add(&self.delta))
    }
}

/// An invertible adapter's inverse alone: a scale of the final hidden states.
struct HeadScale(f64, Point);

impl Adapter for HeadScale {
    fn kind(&self) -> &str {
        "toy_head_scale"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        vec![self.1]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn forward_embeddings(&self, _: Point, io: &EmbeddingIo, _: &ForwardCtx) -> Result<Tensor> {
        io.embeddings * self.0
    }
}

fn attach(model: &mut LoadedModel, name: &str, adapter: impl Adapter + 'static) {
    model.backbone.adapters_mut().add(name, Box::new(adapter)).unwrap();
}

fn activate(model: &mut LoadedModel, names: &[&str]) {
    model.backbone.adapters_mut().activate(names).unwrap();
}

/// Right-padded ids and mask of texts.
fn batch(model: &LoadedModel, texts: &[&str]) -> (Tensor, Tensor, Vec<usize>) {
    let rows: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenizer.encode(t, model.backbone.is_encoder()).unwrap()).collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (ids, mask) = adapters_models::heads::pad(&refs, &Device::Cpu).unwrap();
    (ids, mask, rows.iter().map(Vec::len).collect())
}

#[test]
fn every_new_site_is_offered_by_both_backbones() {
    for (name, heads_input) in [("all-MiniLM-L6-v2", false), ("SmolLM2-135M-Instruct.Q4_1.gguf", true)] {
        let info = load(name).backbone.model_info();
        let count = |site: Site| info.points.iter().filter(|p| p.point.site == site).count();
        assert_eq!(count(Site::KeyValuePrefix), info.num_layers, "{name}");
        assert_eq!(count(Site::LayerOutput), info.num_layers, "{name}");
        assert_eq!(count(Site::InputEmbeddings), 1, "{name}");
        assert_eq!(count(Site::LmHeadInput), usize::from(heads_input), "{name}: only decoders have an LM head");
        assert!(info.points.iter().all(|p| p.point.site.kind() != SiteKind::Hidden || p.in_features == info.hidden_size));
    }
}

/// Virtual tokens equal to the embeddings of real tokens X compute what the text X + T
/// computes at T's positions: on MiniLM for padded rows, on SmolLM2 also through prefill
/// and a decoding step, whose cache keeps the virtual tokens.
#[test]
fn virtual_tokens_act_as_text_prepended_on_both_backbones() {
    for name in ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let mut model = load(name);
        let x_ids = model.tokenizer.encode("on a rainy day", false).unwrap();
        let prompt = word_embeddings(&model).index_select(&Tensor::new(x_ids.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
        let texts = ["the movie was great", "I did not like the long ending at all"];
        let (ids, mask, _) = batch(&model, &texts);
        let p = x_ids.len();
        let rows = ids.dim(0).unwrap();
        let x = Tensor::new(x_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((rows, 1)).unwrap();
        let joined = Tensor::cat(&[&x, &ids], 1).unwrap();
        let joined_mask = Tensor::cat(&[&x.ones_like().unwrap(), &mask], 1).unwrap();
        let ctx = ForwardCtx::inference();
        let reference = model.backbone.hidden_states(&joined, &joined_mask, &ctx).unwrap();
        let reference = reference.narrow(1, p, ids.dim(1).unwrap()).unwrap();
        attach(&mut model, "prompt", Prompt(prompt));
        activate(&mut model, &["prompt"]);
        let with_prompt = model.backbone.hidden_states(&ids, &mask, &ctx).unwrap();
        // Compare real tokens only (padding rows of the two runs see different things).
        let keep = mask.unsqueeze(2).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let diff = max_diff(&with_prompt.broadcast_mul(&keep).unwrap(), &reference.broadcast_mul(&keep).unwrap());
        assert!(diff < 2e-4, "{name}: virtual tokens differ from the prepended text by {diff}");
        if let Backbone::Llama(m) = &model.backbone {
            let t: Vec<u32> = model.tokenizer.encode(texts[0], false).unwrap();
            let (logits, mut caches) = m.prefill(&[t.as_slice()], &ctx).unwrap();
            assert_eq!(caches[0].len(), p + t.len(), "the cache holds the virtual tokens");
            let next = 42u32;
            let step = m.decode_step(&[&[next]], &mut caches.iter_mut().collect::<Vec<_>>(), &ctx).unwrap();
            activate(&mut model, &[]);
            let Backbone::Llama(m) = &model.backbone else { unreachable!() };
            let full: Vec<u32> = x_ids.iter().chain(&t).copied().collect();
            let expected = m.last_logits(&Tensor::new(full.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None, &ctx).unwrap();
            assert!(max_diff(&logits, &expected) < 2e-3, "prefill with virtual tokens");
            let full: Vec<u32> = full.into_iter().chain([next]).collect();
            let expected = m.last_logits(&Tensor::new(full.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None, &ctx).unwrap();
            assert!(max_diff(&step, &expected) < 2e-3, "a decoding step after virtual tokens");
        }
    }
}

/// Rows choosing prefixes of different lengths (or none) in one batch get what each gets
/// alone; the prefix changes the output and its keys get a gradient; on SmolLM2 a prefill
/// and a decoding step per row equal the same prompt run whole with its prefix.
#[test]
fn key_value_prefixes_per_row_and_through_the_cache() {
    for name in ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let mut model = load(name);
        let info = model.backbone.model_info();
        let width = info.spec(Point::new(0, Site::KeyValuePrefix)).unwrap().out_features;
        attach(&mut model, "short", Prefix::new(info.num_layers, 2, width, 1));
        attach(&mut model, "long", Prefix::new(info.num_layers, 5, width, 3));
        let texts = ["free prize, call now", "see you at six tonight then", "what is the capital of peru?"];
        let (ids, mask, _) = batch(&model, &texts);
        let choices = vec![vec!["short".to_string()], vec!["long".to_string()], vec![]];
        let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap();
        let together = model.backbone.hidden_states(&ids, &mask, &ctx).unwrap();
        let keep = mask.unsqueeze(2).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let mut changed = 0f32;
        for (row, choice) in choices.iter().enumerate() {
            let names: Vec<&str> = choice.iter().map(String::as_str).collect();
            activate(&mut model, &names);
            let alone =
                model.backbone.hidden_states(&ids.i(row..row + 1).unwrap(), &mask.i(row..row + 1).unwrap(), &ForwardCtx::inference());
            let alone = alone.unwrap().broadcast_mul(&keep.i(row..row + 1).unwrap()).unwrap();
            let mine = together.i(row..row + 1).unwrap().broadcast_mul(&keep.i(row..row + 1).unwrap()).unwrap();
            assert!(max_diff(&mine, &alone) < 2e-4, "{name} row {row} ({choice:?}): batched differs from alone");
            if !choice.is_empty() {
                activate(&mut model, &[]);
                let base =
                    model.backbone.hidden_states(&ids.i(row..row + 1).unwrap(), &mask.i(row..row + 1).unwrap(), &ForwardCtx::inference());
                changed = changed.max(max_diff(&mine, &base.unwrap().broadcast_mul(&keep.i(row..row + 1).unwrap()).unwrap()));
            }
        }
        assert!(changed > 1e-3, "{name}: the prefixes changed nothing");

        // Gradients reach the prefix.
        activate(&mut model, &["long"]);
        let hidden = model.backbone.hidden_states(&ids, &mask, &ForwardCtx::training_seeded(0)).unwrap();
        let grads = hidden.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let adapter = model.backbone.adapters().get("long").unwrap().clone();
        let keys = adapter.vars().into_iter().find(|(n, _)| n == "keys").unwrap().1;
        let g = grads.get(keys.as_tensor()).expect("the prefix keys get a gradient");
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);

        if let Backbone::Llama(m) = &model.backbone {
            let prompts: Vec<Vec<u32>> = texts[..2].iter().map(|t| model.tokenizer.encode(t, false).unwrap()).collect();
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let ctx = ForwardCtx::inference().with_row_choices(&choices[..2], &Device::Cpu).unwrap();
            let (_, mut caches) = m.prefill(&refs, &ctx).unwrap();
            for (c, p) in caches.iter().zip(&prompts) {
                assert_eq!(c.len(), p.len(), "prefixes stay out of the cache");
            }
            let step = m.decode_step(&[&[7], &[9]], &mut caches.iter_mut().collect::<Vec<_>>(), &ctx).unwrap();
            // The same, each prompt and its token fed through the decoding step as one chunk
            // from an empty cache (chunked prefill), under the prefixes.
            let wholes: Vec<Vec<u32>> = (0..2).map(|row| prompts[row].iter().copied().chain([[7, 9][row]]).collect()).collect();
            let mut fresh: Vec<_> = (0..2).map(|_| m.new_cache()).collect();
            let chunked = m.decode_step(&[&wholes[0], &wholes[1]], &mut fresh.iter_mut().collect::<Vec<_>>(), &ctx).unwrap();
            for (row, choice) in choices[..2].iter().enumerate() {
                activate(&mut model, &[choice[0].as_str()]);
                let Backbone::Llama(m) = &model.backbone else { unreachable!() };
                let whole: Vec<u32> = prompts[row].iter().copied().chain([[7, 9][row]]).collect();
                let ids = Tensor::new(whole.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let expected = m.last_logits(&ids, None, &ForwardCtx::inference()).unwrap();
                let diff = max_diff(&step.i(row..row + 1).unwrap(), &expected);
                assert!(diff < 2e-3, "row {row}: a decoding step with a prefix differs from the whole prompt by {diff}");
                let diff = max_diff(&chunked.i(row..row + 1).unwrap(), &expected);
                assert!(diff < 2e-3, "row {row}: a prompt chunk with a prefix differs from the whole prompt by {diff}");
            }
        }
    }
}

/// An intervention at the last layer changes exactly the first and last token of each
/// (padded) row by its vector, and nothing else.
#[test]
fn interventions_change_the_chosen_positions_only() {
    for name in ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let mut model = load(name);
        let info = model.backbone.model_info();
        let last = info.num_layers - 1;
        let (ids, mask, lengths) = batch(&model, &["a short one", "and a much longer sentence than the first one"]);
        let residual = |model: &LoadedModel| match &model.backbone {
            Backbone::Bert(m) => m.forward(&ids, None, Some(&mask), &ForwardCtx::inference()).unwrap(),
            Backbone::Llama(m) => m.residual_stream(&ids, info.num_layers, &ForwardCtx::inference().masked(&mask)).unwrap(),
        };
        let base = residual(&model);
        let delta = randn(&[info.hidden_size], 0.5, 9);
        attach(&mut model, "nudge", Nudge { point: Point::new(last, Site::LayerOutput), delta: delta.clone() });
        activate(&mut model, &["nudge"]);
        let nudged = residual(&model);
        let change = (nudged - &base).unwrap();
        // Adding δ to values of magnitude |x| and subtracting them again loses |x| · 2⁻²⁴.
        let scale: f32 = base.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        let tolerance = 1e-6 + scale * 2f32.powi(-22);
        for (row, &n) in lengths.iter().enumerate() {
            for pos in 0..ids.dim(1).unwrap() {
                let d = change.i((row, pos)).unwrap();
                let expected = if pos == 0 || pos == n - 1 { delta.clone() } else { delta.zeros_like().unwrap() };
                let diff = max_diff(&d, &expected);
                assert!(diff <= tolerance, "{name} row {row} position {pos} (of {n} tokens): off by {diff} (tolerance {tolerance})");
            }
        }
    }
}

/// The LM-head input site sits after the final norm: scaling there scales the final
/// hidden states the head reads, and nothing else.
#[test]
fn the_lm_head_input_sees_the_final_hidden_states() {
    let mut model = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    let last = model.backbone.model_info().num_layers - 1;
    let (ids, mask, _) = batch(&model, &["the capital of France is"]);
    let base = model.backbone.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap();
    attach(&mut model, "scale", HeadScale(1.5, Point::new(last, Site::LmHeadInput)));
    activate(&mut model, &["scale"]);
    let scaled = model.backbone.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap();
    assert!(max_diff(&scaled, &(base * 1.5).unwrap()) < 1e-5);
}
