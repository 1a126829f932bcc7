//! Shared helpers for the family importers: tensor look-up with the prefix a checkpoint
//! uses, linear layers, and node construction.

use super::config::JsonConfig;
use super::error::ImportError;
use crate::graph::{Graph, Node};
use crate::op::{Linear, Op};
use crate::shape::Shape;
use crate::weight::{WeightCatalog, WeightRef};
use petgraph::stable_graph::NodeIndex;
use std::path::PathBuf;

pub(super) struct Ctx<'a> {
    pub catalog: &'a WeightCatalog,
    /// The file a missing tensor is reported against.
    pub weights_path: PathBuf,
    /// Key prefix of the base model (`model.`, `transformer.`, `bert.` or empty).
    pub prefix: String,
}

impl<'a> Ctx<'a> {
    pub fn new(
        _cfg: &JsonConfig,
        catalog: &'a WeightCatalog,
        probes: &[&str],
        probe_key: &str,
    ) -> Self {
        let root = PathBuf::from(&catalog.root);
        let weights_path = if root.join("model.safetensors.index.json").exists() {
            root.join("model.safetensors.index.json")
        } else {
            root.join("model.safetensors")
        };
        let prefix = probes
            .iter()
            .find(|p| catalog.tensors.contains_key(&format!("{p}{probe_key}")))
            .map_or_else(
                || probes.first().copied().unwrap_or("").to_string(),
                |p| p.to_string(),
            );
        Ctx {
            catalog,
            weights_path,
            prefix,
        }
    }

    /// A tensor of the base model (the prefix is added), which must exist.
    pub fn tensor(&self, name: &str, needed_for: &str) -> Result<WeightRef, ImportError> {
        self.exact(&format!("{}{name}", self.prefix), needed_for)
    }

    /// A tensor by its full name, which must exist.
    pub fn exact(&self, full: &str, needed_for: &str) -> Result<WeightRef, ImportError> {
        if self.catalog.tensors.contains_key(full) {
            Ok(WeightRef::file(full))
        } else {
            Err(ImportError::MissingTensor {
                path: self.weights_path.clone(),
                tensor: full.to_string(),
                needed_for: needed_for.to_string(),
            })
        }
    }

    /// A linear layer `{base}.weight` (and `{base}.bias` when `bias`).
    pub fn linear(
        &self,
        base: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        needed_for: &str,
    ) -> Result<Linear, ImportError> {
        Ok(Linear {
            weight: self.tensor(&format!("{base}.weight"), needed_for)?,
            bias: if bias {
                Some(self.tensor(&format!("{base}.bias"), needed_for)?)
            } else {
                None
            },
            in_features,
            out_features,
            adapter: None,
        })
    }
}

/// Adds a node whose output is one vector of `width` per token.
pub(super) fn add_node(
    g: &mut Graph,
    name: impl Into<String>,
    op: Op,
    layer: Option<usize>,
    width: usize,
    inputs: &[NodeIndex],
) -> NodeIndex {
    g.add(
        Node {
            name: name.into(),
            op,
            layer,
            shape: Shape::per_token(width),
        },
        inputs,
    )
}

/// Adds the token input node.
pub(super) fn add_input(g: &mut Graph) -> NodeIndex {
    g.add(
        Node {
            name: "input".into(),
            op: Op::TokenInput,
            layer: None,
            shape: Shape::tokens(),
        },
        &[],
    )
}
