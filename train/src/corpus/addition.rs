//! [`Task::Addition`]: `add: 347+285=2360` (the sum, least-significant digit first).

use super::{Builder, Example, Rng, Task};

pub(super) fn sample(rng: &mut Rng) -> Example {
    let n = rng.between(2, 3);
    let a: Vec<u8> = (0..n).map(|_| rng.digit()).collect();
    let b: Vec<u8> = (0..n).map(|_| rng.digit()).collect();
    Builder::new(Task::Addition)
        .push("add: ")
        .symbols(&a)
        .push("+")
        .symbols(&b)
        .push("=")
        .answer_symbols(&reversed_sum(&a, &b))
        .build()
}

/// Sum of two equal-length ASCII digit strings (most-significant first), as `n + 1` ASCII
/// digits, least-significant first.
pub(super) fn reversed_sum(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len() + 1);
    let mut carry = 0;
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        let s = (x - b'0') + (y - b'0') + carry;
        out.push(b'0' + s % 10);
        carry = s / 10;
    }
    out.push(b'0' + carry);
    out
}
