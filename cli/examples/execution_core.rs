//! The execution core from the library: import a checkpoint, add exit heads, lower, run two
//! sequences in one call, roll one back, and generate through the runtime.

use candle_core::{DType, Device};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::{Program, Run, Segment, Want};
use exitgraph::passes::{HeadKind, InsertExits, PassManager};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
    let mut graph = exitgraph_ir::import(&dir)?.graph;
    let exits = InsertExits {
        after: vec![2],
        every: None,
        head: HeadKind::default(),
        gate: false,
        weights: None,
    };
    PassManager::new(vec![Box::new(exits)]).run(&mut graph)?;
    // Structure is typed: blocks (weight identity, KV slot) and the exit the pass recorded.
    let block = &graph.blocks[2];
    println!(
        "block 2 uses layer {}'s weights, KV slot {:?}",
        block.weights, block.kv_slot
    );
    let exit = graph
        .exit_at(2)
        .and_then(|e| e.logits)
        .ok_or_else(|| anyhow::anyhow!("the pass records its exit"))?;

    let program = Program::lower(&graph, &dir, &Device::Cpu, DType::F32)?;
    // One call, two sequences: the model's logits at every position, the exit head's at
    // each sequence's last token.
    let (a, b) = (vec![5u32, 17, 42], vec![7u32, 9]);
    let (mut cache_a, mut cache_b) = (program.new_cache(), program.new_cache());
    let want = vec![Want::all(program.logits_node()?), Want::last(exit)];
    let out = program.run(
        &mut [
            Segment::new(&a, &mut cache_a),
            Segment::new(&b, &mut cache_b),
        ],
        &Run::outputs(want),
    )?;
    println!(
        "logits {:?}, exit logits {:?}",
        out[0][0].dims(),
        out[0][1].dims()
    );

    // Roll the first sequence back to two tokens and continue differently.
    cache_a.truncate(2)?;
    let next = program.forward_ragged(&mut [Segment::new(&[8], &mut cache_a)])?;
    println!(
        "after rollback: {} positions, logits {:?}",
        cache_a.len(),
        next[0].dims()
    );

    // Generation runs through the ECS runtime.
    let rows = generate(&program, &[a], &GenerateOptions::greedy(4))?;
    println!("greedy: {:?}", rows[0]);
    Ok(())
}
