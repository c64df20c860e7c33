//! Loading real-format model directories, and the errors for broken ones: each names the tensor
//! or field and the file. The fixtures are variants of the committed tiny model, written here.

use std::path::{Path, PathBuf};

use flexgen_model::{DummyInit, Error, Model, spec_by_name};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/tiny-random-opt")
}

/// Tensors as (name, dtype, shape, bytes).
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Every tensor of the tiny model.
fn tiny_tensors() -> Tensors {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A model directory with the tiny model's config and tokenizer and the given tensors.
fn model_dir(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    write_safetensors(&dir.path().join("model.safetensors"), tensors);
    dir
}

fn logits_of(model: &Model) -> Vec<f32> {
    model
        .forward_all(&[vec![2, 100, 200, 300]], &[vec![true; 4]])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn loads_the_tiny_model_with_its_tokenizer() {
    let m = Model::load(&tiny()).unwrap();
    assert_eq!((m.spec.num_layers, m.spec.hidden_size, m.spec.num_heads), (2, 64, 4));
    assert_eq!(m.tokenizer.as_ref().unwrap().encode("In the").unwrap()[0], 2, "BOS first");
}

#[test]
fn sharded_index_loads_the_same_weights() {
    let all = tiny_tensors();
    let dir = model_dir(&all);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (a, b) = all.split_at(all.len() / 2);
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                t.0.clone(),
                format!("model-0000{}-of-00002.safetensors", 1 + usize::from(i >= a.len())).into(),
            )
        })
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(
        logits_of(&Model::load(dir.path()).unwrap()),
        logits_of(&Model::load(&tiny()).unwrap())
    );
}

#[test]
fn an_index_that_misplaces_a_tensor_is_refused() {
    let all = tiny_tensors();
    let dir = model_dir(&all);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (moved, rest): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|t| t.0 == all[1].0);
    write_safetensors(&dir.path().join("a.safetensors"), &rest);
    write_safetensors(&dir.path().join("b.safetensors"), &moved);
    // The index claims everything is in a.safetensors, but all[1] is in b.safetensors.
    let map: serde_json::Map<String, serde_json::Value> =
        all.iter().map(|t| (t.0.clone(), "a.safetensors".into())).collect();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let msg = Model::load(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains(&all[1].0) && msg.contains("a.safetensors") && msg.contains("index.json"),
        "{msg}"
    );
}

#[test]
fn an_index_naming_a_file_outside_the_model_directory_is_refused() {
    let all = tiny_tensors();
    let dir = model_dir(&all);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    // A real safetensors file beside the model directory: the index must not reach it.
    let outside = tempfile::tempdir().unwrap();
    write_safetensors(&outside.path().join("x.safetensors"), &all);
    for shard in [
        outside.path().join("x.safetensors").display().to_string(),
        format!("../{}/x.safetensors", outside.path().file_name().unwrap().to_str().unwrap()),
        "sub/x.safetensors".to_string(),
    ] {
        let map: serde_json::Map<String, serde_json::Value> =
            all.iter().map(|t| (t.0.clone(), shard.clone().into())).collect();
        let index = serde_json::json!({"weight_map": map});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let msg = Model::load(dir.path()).err().unwrap().to_string();
        assert!(msg.contains("not a file name in the model directory"), "{shard}: {msg}");
    }
}

#[test]
fn hf_cache_entry_resolves_through_refs_main() {
    let cache = tempfile::tempdir().unwrap();
    let entry = cache.path().join("models--flexgen--tiny");
    let snap = entry.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd\n").unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), snap.join(f)).unwrap();
    }
    let from_entry = Model::load(&entry).unwrap();
    assert_eq!(from_entry.dir.as_deref(), Some(snap.as_path()));
    assert_eq!(logits_of(&from_entry), logits_of(&Model::load(&snap).unwrap()));
}

#[test]
fn missing_tensor_is_named() {
    let all: Vec<_> =
        tiny_tensors().into_iter().filter(|t| t.0 != "model.decoder.layers.1.fc2.bias").collect();
    let dir = model_dir(&all);
    match Model::load(dir.path()) {
        Err(Error::MissingTensor { name, searched }) => {
            assert_eq!(name, "model.decoder.layers.1.fc2.bias");
            assert!(searched.contains("model.safetensors"), "{searched}");
        }
        other => panic!("{:?}", other.err()),
    }
}

/// `Model::open_lazy` (the CUDA executor's load): nothing read at open; the tables on request are
/// the loaded ones rounded to fp16 once, and every layer read on request equals the eagerly
/// loaded one tensor for tensor, for each family of the test models; the same for a lazy dummy
/// model's tables. A lazy model has no reference pass.
#[test]
fn layers_read_on_request_equal_the_loaded_ones() {
    for name in ["tiny-random-opt", "tiny-random-opt-350m", "tiny-random-llama-bf16"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data").join(name);
        let (eager, lazy) = (Model::load(&dir).unwrap(), Model::open_lazy(&dir).unwrap());
        assert!(lazy.weights.layers.is_empty(), "{name}: no layer is read at load");
        assert_eq!(lazy.weights.token_embedding.elem_count(), 0, "{name}: nor a table");
        assert!(lazy.has_layers() && eager.has_layers(), "{name}");
        assert!(lazy.is_lazy() && !eager.is_lazy(), "{name}");
        let refused = lazy.forward_all(&[vec![2, 100]], &[vec![true; 2]]).unwrap_err().to_string();
        assert!(refused.contains("Model::load") && !refused.contains("  "), "{name}: {refused}");
        let flat = |t: &flexgen_tensor::Tensor| -> Vec<f32> {
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        // The tables in fp16, the values the CUDA executor uploads: the f32 ones rounded once.
        let tables = lazy.tables().unwrap();
        assert!(tables.layers.is_empty(), "{name}: the tables alone");
        let lazy_embed = &tables.token_embedding;
        assert_eq!(lazy_embed.dtype(), flexgen_tensor::DType::F16, "{name}");
        let rounded: Vec<f32> = flat(&eager.weights.token_embedding)
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(
            rounded,
            flat(&lazy_embed.to_dtype(flexgen_tensor::DType::F32).unwrap()),
            "{name}"
        );
        for i in 0..eager.spec.num_layers {
            let (a, b) = (eager.layer(i).unwrap().unwrap(), lazy.layer(i).unwrap().unwrap());
            let (ta, tb) = (a.tensors(), b.tensors());
            assert_eq!(ta.len(), tb.len(), "{name} layer {i}");
            for (x, y) in ta.iter().zip(&tb) {
                assert_eq!((x.dims(), flat(x)), (y.dims(), flat(y)), "{name} layer {i}");
            }
        }
        assert!(lazy.layer(eager.spec.num_layers).unwrap().is_none(), "{name}: past the last");
    }
    let spec = spec_by_name("opt-125m").unwrap();
    let init = DummyInit::Random { seed: 3 };
    let dummy = Model::dummy_lazy(spec.clone(), init).unwrap();
    assert!(!dummy.has_layers() && dummy.layer(0).unwrap().is_none() && dummy.is_lazy());
    let (made, held) = (dummy.tables().unwrap(), Model::dummy(spec, init).unwrap());
    let as_f32 = |t: &flexgen_tensor::Tensor| -> Vec<f32> {
        t.to_dtype(flexgen_tensor::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let rounded: Vec<f32> = as_f32(&held.weights.token_embedding)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(as_f32(&made.token_embedding), rounded, "the dummy tables on request");
    assert!(matches!(held.tables().unwrap(), std::borrow::Cow::Borrowed(_)), "held: no copy");
}

/// A broken layer or table tensor is refused when a lazy model is opened, not when it is placed.
#[test]
fn open_lazy_checks_every_tensor_up_front() {
    // The error of opening the tiny model with `edit` applied to its tensors.
    let refused = |edit: &dyn Fn(&mut Tensors)| -> Error {
        let mut tensors = tiny_tensors();
        edit(&mut tensors);
        let dir = model_dir(&tensors);
        Model::open_lazy(dir.path()).err().expect("refused at open")
    };
    let transpose = |name: &'static str| {
        move |all: &mut Tensors| {
            let t = all.iter_mut().find(|t| t.0 == name).unwrap();
            t.2 = vec![t.2[1], t.2[0]];
        }
    };
    for name in ["model.decoder.layers.1.fc1.weight", "model.decoder.embed_tokens.weight"] {
        match refused(&transpose(name)) {
            Error::Shape { name: n, .. } => assert_eq!(n, name),
            other => panic!("{other:?}"),
        }
    }
    match refused(&|all| all.retain(|t| t.0 != "model.decoder.layers.1.fc2.bias")) {
        Error::MissingTensor { name, .. } => assert_eq!(name, "model.decoder.layers.1.fc2.bias"),
        other => panic!("{other:?}"),
    }
    let to_i32 = |all: &mut Tensors| {
        all.iter_mut().find(|t| t.0 == "model.decoder.layers.0.fc2.bias").unwrap().1 = Dtype::I32;
    };
    match refused(&to_i32) {
        Error::Dtype { name, .. } => assert_eq!(name, "model.decoder.layers.0.fc2.bias"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let mut all = tiny_tensors();
    let t = all.iter_mut().find(|t| t.0 == "model.decoder.layers.0.fc1.weight").unwrap();
    t.2 = vec![t.2[1], t.2[0]]; // transposed
    let dir = model_dir(&all);
    match Model::load(dir.path()) {
        Err(Error::Shape { name, path, expected, found }) => {
            assert_eq!(name, "model.decoder.layers.0.fc1.weight");
            assert!(path.ends_with("model.safetensors"));
            assert_eq!((expected, found), (vec![256, 64], vec![64, 256]));
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn wrong_dtype_is_named() {
    let mut all = tiny_tensors();
    let t = all.iter_mut().find(|t| t.0 == "model.decoder.final_layer_norm.weight").unwrap();
    t.1 = Dtype::I32;
    let dir = model_dir(&all);
    match Model::load(dir.path()) {
        Err(Error::Dtype { name, dtype, .. }) => assert_eq!(
            (name.as_str(), dtype.as_str()),
            ("model.decoder.final_layer_norm.weight", "I32")
        ),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn half_precision_files_load_as_the_same_model() {
    let all: Vec<_> = tiny_tensors()
        .into_iter()
        .map(|(n, _, s, b)| {
            let half: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| {
                    half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            (n, Dtype::F16, s, half)
        })
        .collect();
    let dir = model_dir(&all);
    let a = logits_of(&Model::load(dir.path()).unwrap());
    let b = logits_of(&Model::load(&tiny()).unwrap());
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(max < 0.05, "fp16 rounding of weights moved logits by {max}");
    assert!(max > 0.0, "the f16 file was not actually read");
}

#[test]
fn truncated_file_is_reported_with_its_path() {
    let dir = model_dir(&tiny_tensors());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    match Model::load(dir.path()) {
        Err(Error::Safetensors { path, message }) => {
            assert_eq!(path, p);
            assert!(message.contains("truncated") || message.contains("valid"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn directory_without_weights_or_config_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Err(Error::NotAModel { hint, .. }) = Model::load(dir.path()) else { panic!() };
    assert!(hint.contains("config.json"), "{hint}");
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
    let Err(Error::NotAModel { hint, .. }) = Model::load(dir.path()) else { panic!() };
    assert!(hint.contains("safetensors"), "{hint}");
    let Err(Error::NotAModel { hint, .. }) = Model::load(&dir.path().join("nope")) else {
        panic!()
    };
    assert!(hint.contains("no such"), "{hint}");
}

#[test]
fn config_errors_name_the_file_and_field() {
    let dir = model_dir(&tiny_tensors());
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 3");
    std::fs::write(&p, text).unwrap();
    let r = Model::load(dir.path());
    let Err(Error::Config { path, field, .. }) = r else { panic!("{:?}", r.err()) };
    assert_eq!((path, field.as_str()), (p, "num_attention_heads"));
}

#[test]
fn vocab_size_that_disagrees_with_the_weights_names_the_embedding() {
    let dir = model_dir(&tiny_tensors());
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"vocab_size\": 4096", "\"vocab_size\": 4000");
    std::fs::write(&p, text).unwrap();
    // The weights no longer match either; the tensor check comes first and names the embedding.
    let Err(Error::Shape { name, .. }) = Model::load(dir.path()) else { panic!() };
    assert_eq!(name, "model.decoder.embed_tokens.weight");
}

#[test]
fn dummy_weights_exist_for_every_spec_and_are_deterministic() {
    let mut spec = spec_by_name("opt-125m").unwrap();
    spec.num_layers = 1; // keep the test small; the shapes are the real ones
    let a = Model::dummy(spec.clone(), DummyInit::Random { seed: 3 }).unwrap();
    let b = Model::dummy(spec.clone(), DummyInit::Random { seed: 3 }).unwrap();
    let ones = Model::dummy(spec, DummyInit::Ones).unwrap();
    assert_eq!(a.weights.token_embedding.dims(), &[50272, 768]);
    assert_eq!(logits_of(&a), logits_of(&b));
    let w: Vec<f32> = ones.weights.layers[0].q.weight.flatten_all().unwrap().to_vec1().unwrap();
    assert!(w.iter().all(|&x| x == 1.0));
}
