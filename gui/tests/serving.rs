//! Prompts and workloads through the runtime, as the Run and Simulator views use them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use exitgraph::generate::Sampling;
use exitgraph::pipeline::Pipeline;
use exitgraph::runtime::policy::Batching;
use exitgraph_gui::loaded::Loaded;
use exitgraph_gui::serving::{run_prompts, simulate, PromptRun, SimRun};
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn demo() -> Loaded {
    let path = examples().join("demo.ron");
    Loaded::compile(&Pipeline::read(&path).unwrap(), &path).unwrap()
}

#[test]
fn prompts_run_through_the_runtime_with_one_record_per_token() {
    let l = demo();
    let prompts: Vec<Vec<u32>> = ["copy: K7F2Q | K", "add: 347+285="]
        .iter()
        .map(|p| l.tokens.encode(p).unwrap())
        .collect();
    let run = PromptRun {
        prompts: prompts.clone(),
        max_new_tokens: 4,
        sampling: Sampling::Greedy,
        seed: 0,
        stop_ids: Vec::new(),
        depth: exitgraph::exits::Depth::Full,
        skipped_kv: exitgraph::exits::SkippedKv::Filled,
    };
    let out = run_prompts(&l.source(), &run, None).unwrap();
    assert_eq!(out.outputs.len(), 2);
    assert!(out.outputs.iter().all(|o| o.len() == 4));
    assert_eq!(out.records.len(), 8);
    for r in &out.records {
        assert_eq!(r.layers, (0..8).collect::<Vec<_>>());
        assert_eq!(r.exit_layer, 8);
        assert!(r.signals.is_empty());
        assert!(r.pos >= prompts[r.seq].len());
        assert_eq!(
            r.token,
            Some(out.outputs[r.seq][r.pos - prompts[r.seq].len()])
        );
    }
    assert_eq!(l.tokens.text(&out.outputs[0]), "7F2Q");
}

#[test]
fn simulation_errors_are_messages() {
    let l = demo();
    let sim = |workload: &str, cost: &str| SimRun {
        workload: examples().join("workloads").join(workload),
        cost: examples().join(cost),
        batching: Batching::Continuous {
            max_batch: 8,
            token_budget: 512,
        },
        sampling: Sampling::Greedy,
        seed: 0,
        depth: exitgraph::exits::Depth::Full,
    };
    let e = simulate(&l.source(), &sim("sim-100k.ron", "demo-cost.ron"), None).unwrap_err();
    assert!(e.to_string().contains("exitgraph serve"), "{e}");
    let e = simulate(&l.source(), &sim("burst.ron", "missing.ron"), None).unwrap_err();
    assert!(e.to_string().contains("missing.ron"), "{e}");
    let (report, records) =
        simulate(&l.source(), &sim("burst.ron", "demo-cost.ron"), None).unwrap();
    assert_eq!(report.completed, 32);
    assert_eq!(records.len(), report.generated_tokens);
    assert!(records.iter().all(|r| r.token.is_none()));
}

#[test]
fn a_pipeline_whose_model_is_missing_is_an_error() {
    let p = Pipeline::parse("Pipeline(model: \"no-such-model\")", Path::new("p.ron")).unwrap();
    let e = Loaded::compile(&p, Path::new("p.ron")).err().unwrap();
    assert!(e.to_string().contains("no-such-model"), "{e}");
}
