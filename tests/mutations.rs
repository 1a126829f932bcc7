#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Random mutations of valid inputs never panic (proptest): a pipeline RON file, a
//! checkpoint's `config.json` and its safetensors header are mutated byte-wise (deleted,
//! inserted, replaced or duplicated bytes, truncation; the header's length prefix kept or
//! broken). Pipelines are read and compiled; checkpoints are imported, lowered and run for
//! two tokens. Each attempt must end in an error or a result: never a panic. The mutations that
//! still parse must give a result that verifies; the test asserts that most mutations are
//! rejected, so a parser that accepts anything fails it.

use candle_core::{DType, Device, Tensor};
use exitgraph::lower::{Inputs, Program};
use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::synth::SplitMix64;
use proptest::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Mutations tried per input kind (also quoted in the README's reliability section).
const CASES: u32 = 300;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

/// Bytes that matter to RON and JSON syntax, and a few that do not.
const INTERESTING: &[u8] = b"()[]{},:\"'0123456789-.eE+_ aZ\n/\\\x00\xff";

/// One to three random byte edits of `text`.
fn mutate(text: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut out = text.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(out.len().max(1));
        let byte = INTERESTING[rng.below(INTERESTING.len())];
        match rng.below(5) {
            0 if !out.is_empty() => {
                out.remove(at);
            }
            1 => out.insert(at, byte),
            2 if !out.is_empty() => out[at] = byte,
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(at..at, span);
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// Runs `f`, turning a panic into a test failure naming `what`.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

/// Lowers the checkpoint in `dir` and runs two tokens through it; `Ok` when it all worked.
fn load_and_run(dir: &Path) -> anyhow::Result<()> {
    let ckpt = exitgraph_ir::import(dir)?;
    exitgraph_ir::verify(&ckpt.graph)?;
    let p = Program::lower(&ckpt.graph, dir, &Device::Cpu, DType::F32)?;
    let inputs = Inputs {
        input_ids: Tensor::from_vec(vec![1u32, 2], (1, 2), &Device::Cpu)?,
        attention_mask: None,
        token_type_ids: None,
        example_ids: None,
    };
    p.forward(&inputs, &mut p.new_cache(), &["logits"], false)?;
    Ok(())
}

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

const PIPELINE: &str = r#"Pipeline(
    version: 1,
    model: "MODEL",
    dtype: F32,
    passes: [
        InsertExits(after: [1], head: SharedLmHead(norm: true)),
        TruncateLayers(keep: 2),
    ],
    runtime: (
        max_new_tokens: 4,
        sampling: Temperature(temperature: 0.8, top_p: Some(0.9)),
        depth: EarlyExit(rule: Any([Confidence(0.9), Decaying(rule: Margin(0.5), tau: 4.0)])),
        batching: Continuous(max_batch: 4, token_budget: 64),
    ),
)
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn mutated_pipelines_never_panic(seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let text = PIPELINE.replace("MODEL", &fixture().to_string_lossy());
        let mut rng = SplitMix64::new(seed);
        let path = dir.path().join("pipeline.ron");
        std::fs::write(&path, mutate(text.as_bytes(), &mut rng)).unwrap();
        no_panic("pipeline", || {
            if let Ok(p) = Pipeline::read(&path) {
                if let Ok(c) = compile(&p, &path) {
                    // What compiles is a verified graph whose depth strategy fits it, or an
                    // error there.
                    exitgraph_ir::verify(&c.graph).expect("a compiled graph verifies");
                    let _ = p.runtime.depth.validate(&c.graph);
                }
            }
        });
    }

    #[test]
    fn mutated_configs_never_panic(seed in any::<u64>()) {
        let dir = copy_fixture();
        let text = std::fs::read(dir.path().join("config.json")).unwrap();
        let mut rng = SplitMix64::new(seed);
        std::fs::write(dir.path().join("config.json"), mutate(&text, &mut rng)).unwrap();
        no_panic("config.json", || load_and_run(dir.path()).is_ok());
    }

    #[test]
    fn mutated_safetensors_headers_never_panic(seed in any::<u64>(), fix_length in any::<bool>()) {
        let dir = copy_fixture();
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let (header, data) = (&bytes[8..8 + n], &bytes[8 + n..]);
        let mut rng = SplitMix64::new(seed);
        let header = mutate(header, &mut rng);
        let len = if fix_length { header.len() as u64 } else { n as u64 };
        let mut out = len.to_le_bytes().to_vec();
        out.extend(&header);
        out.extend(data);
        std::fs::write(dir.path().join("model.safetensors"), out).unwrap();
        no_panic("model.safetensors", || load_and_run(dir.path()).is_ok());
    }
}

/// The unmutated inputs work (so rejections are the mutations' doing), and most mutations
/// of config.json and of the safetensors header are rejected: a loader that accepted
/// anything would fail here.
#[test]
fn most_mutations_are_rejected_and_the_originals_work() {
    let dir = copy_fixture();
    load_and_run(dir.path()).expect("the fixture runs");
    let pdir = tempfile::tempdir().unwrap();
    let path = pdir.path().join("pipeline.ron");
    std::fs::write(
        &path,
        PIPELINE.replace("MODEL", &fixture().to_string_lossy()),
    )
    .unwrap();
    let p = Pipeline::read(&path).expect("the pipeline reads");
    compile(&p, &path).expect("the pipeline compiles");
    let config = std::fs::read(dir.path().join("config.json")).unwrap();
    let mut rejected = 0;
    let tries = 60;
    for seed in 0..tries {
        let mut rng = SplitMix64::new(seed);
        std::fs::write(dir.path().join("config.json"), mutate(&config, &mut rng)).unwrap();
        rejected += usize::from(no_panic("config.json", || {
            load_and_run(dir.path()).is_err()
        }));
    }
    assert!(
        rejected * 4 > tries as usize,
        "only {rejected} of {tries} mutated configs were rejected"
    );
    std::fs::write(dir.path().join("config.json"), &config).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rejected = 0;
    for seed in 0..tries {
        let mut rng = SplitMix64::new(seed);
        let header = mutate(&bytes[8..8 + n], &mut rng);
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(&header);
        out.extend(&bytes[8 + n..]);
        std::fs::write(dir.path().join("model.safetensors"), out).unwrap();
        rejected += usize::from(no_panic("model.safetensors", || {
            load_and_run(dir.path()).is_err()
        }));
    }
    assert!(
        rejected * 2 > tries as usize,
        "only {rejected} of {tries} mutated headers were rejected"
    );
}
