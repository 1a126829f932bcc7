//! Symbolic tensor shapes: passes reason about `batch` and `seq` without a tensor.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One dimension of a symbolic shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// Number of sequences in a batch; known only at run time.
    Batch,
    /// Number of tokens per sequence in one call; known only at run time.
    Seq,
    /// A size fixed by the model (hidden size, vocabulary, ...).
    Known(usize),
}

/// A symbolic shape, outermost dimension first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// `[batch, seq]`: token ids.
    pub fn tokens() -> Self {
        Shape(vec![Dim::Batch, Dim::Seq])
    }

    /// `[batch, seq, width]`: one vector per token.
    pub fn per_token(width: usize) -> Self {
        Shape(vec![Dim::Batch, Dim::Seq, Dim::Known(width)])
    }

    /// `[batch, width]`: one vector per sequence.
    pub fn per_sequence(width: usize) -> Self {
        Shape(vec![Dim::Batch, Dim::Known(width)])
    }

    /// The size of the last dimension when it is known.
    pub fn last_known(&self) -> Option<usize> {
        match self.0.last() {
            Some(Dim::Known(n)) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => write!(f, "batch"),
            Dim::Seq => write!(f, "seq"),
            Dim::Known(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_readable() {
        assert_eq!(Shape::per_token(64).to_string(), "[batch, seq, 64]");
        assert_eq!(Shape::tokens().last_known(), None);
        assert_eq!(Shape::per_sequence(8).last_known(), Some(8));
    }
}
