//! Rendering a plan for people (terraform-style text) and for machines (stable JSON).
//!
//! JSON document, `format_version` 1:
//! ```json
//! { "format_version": 1,
//!   "summary": { "add": 2, "change": 1, "replace": 1, "destroy": 0 },
//!   "steps": [ { "address": "container.web", "kind": "container", "name": "web",
//!                "action": "replace", "ops": ["stop_container", "remove_container", "create_container", "start_container"],
//!                "reasons": [ { "field": "env.GREETING", "before": "\"hi\"", "after": "\"hello\"",
//!                               "forces_replacement": true, "message": "env.GREETING: \"hi\" → \"hello\" forces replacement" } ],
//!                "source": "web.toml:12" } ],
//!   "kept": [ { "address": "volume.old", "kind": "volume", "name": "old", "message": "orphaned, kept" } ] }
//! ```
//! `action` is one of create, update, replace, destroy; steps are in execution order.

use super::{Plan, Summary};
use serde::Serialize;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct JsonPlan<'a> {
    format_version: u32,
    summary: Summary,
    steps: &'a [super::Step],
    kept: &'a [super::Kept],
}

pub fn to_json(plan: &Plan) -> String {
    let doc = JsonPlan {
        format_version: FORMAT_VERSION,
        summary: plan.summary(),
        steps: &plan.steps,
        kept: &plan.kept,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
}

pub fn summary_line(s: &Summary) -> String {
    format!(
        "Plan: {} to add, {} to change, {} to replace, {} to destroy.",
        s.add, s.change, s.replace, s.destroy
    )
}

/// One line a step: `{symbol} {address} ({reasons})`.
pub fn step_line(st: &super::Step) -> String {
    let reasons: Vec<&str> = st.reasons.iter().map(|r| r.message.as_str()).collect();
    if reasons.is_empty() {
        format!("{:>3} {}", st.action.symbol(), st.address)
    } else {
        format!(
            "{:>3} {} ({})",
            st.action.symbol(),
            st.address,
            reasons.join("; ")
        )
    }
}

pub fn to_text(plan: &Plan) -> String {
    let mut out = String::new();
    for st in &plan.steps {
        out.push_str(&step_line(st));
        out.push('\n');
    }
    for k in &plan.kept {
        out.push_str(&format!("    {} ({})\n", k.address, k.message));
    }
    if plan.steps.is_empty() {
        if !plan.kept.is_empty() {
            out.push('\n');
        }
        out.push_str("No changes.\n");
    } else {
        out.push('\n');
        out.push_str(&summary_line(&plan.summary()));
        out.push('\n');
    }
    out
}
