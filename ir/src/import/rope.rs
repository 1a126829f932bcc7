//! RoPE settings from a config: `rope_theta` at the top level or inside `rope_parameters`,
//! scaling from `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4).

use super::config::JsonConfig;
use super::error::ImportError;
use crate::op::{Rope, RopeScaling};

pub(super) fn rope_from_config(
    cfg: &JsonConfig,
    head_dim: usize,
    default_theta: f64,
) -> Result<Rope, ImportError> {
    let theta_field = if cfg.has("rope_parameters.rope_theta") {
        "rope_parameters.rope_theta"
    } else {
        "rope_theta"
    };
    let theta = cfg.positive_f64(theta_field, default_theta)?;
    let scaling_obj = if cfg.get("rope_parameters").is_some_and(|v| v.is_object()) {
        Some("rope_parameters")
    } else if cfg.get("rope_scaling").is_some_and(|v| v.is_object()) {
        Some("rope_scaling")
    } else if let Some(v) = cfg.get("rope_scaling") {
        return Err(cfg.error("rope_scaling", format!("expected an object, got {v}")));
    } else {
        None
    };
    let scaling = match scaling_obj {
        None => RopeScaling::Default,
        Some(obj) => {
            let type_field = if cfg.has(&format!("{obj}.rope_type")) {
                format!("{obj}.rope_type")
            } else {
                format!("{obj}.type")
            };
            let kind = cfg.opt_str(&type_field)?.unwrap_or("default");
            let factor = |cfg: &JsonConfig| -> Result<f64, ImportError> {
                let f = format!("{obj}.factor");
                match cfg.opt_f64(&f)? {
                    Some(x) if x >= 1.0 && x.is_finite() => Ok(x),
                    Some(x) => Err(cfg.error(&f, format!("must be a number >= 1, got {x}"))),
                    None => Err(cfg.error(&f, "missing")),
                }
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor: factor(cfg)? },
                "llama3" => {
                    let low = cfg.positive_f64(&format!("{obj}.low_freq_factor"), 1.0)?;
                    let high = cfg.positive_f64(&format!("{obj}.high_freq_factor"), 4.0)?;
                    if high <= low {
                        return Err(cfg.error(
                            &format!("{obj}.high_freq_factor"),
                            format!("must exceed low_freq_factor ({low}), got {high}"),
                        ));
                    }
                    RopeScaling::Llama3 {
                        factor: factor(cfg)?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: cfg
                            .usize(&format!("{obj}.original_max_position_embeddings"))?,
                    }
                }
                other => {
                    return Err(cfg.error(
                        &type_field,
                        format!("rope type \"{other}\" is not supported (supported: default, linear, llama3)"),
                    ))
                }
            }
        }
    };
    let partial = cfg.positive_f64("partial_rotary_factor", 1.0)?;
    if partial > 1.0 {
        return Err(cfg.error(
            "partial_rotary_factor",
            format!("must be in (0, 1], got {partial}"),
        ));
    }
    let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
    if rotary_dim == 0 {
        return Err(cfg.error("partial_rotary_factor", "leaves no dimension to rotate"));
    }
    Ok(Rope {
        theta,
        scaling,
        rotary_dim,
    })
}
