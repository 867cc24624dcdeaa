//! Dependency licences: every crate built into Herald (for this platform)
//! is under licences on the allow-list below, read from `cargo metadata`.
//! Security advisories (RustSec) need their database from GitHub, which
//! this workplace cannot reach, so they are not checked here.

use std::process::Command;

use serde_json::Value;

/// Permissive licences (and MPL-2.0's file-level copyleft) that let anyone
/// run, ship and sell Herald.
const ALLOWED: &[&str] = &[
    "0BSD",
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSL-1.0",
    "CC0-1.0",
    "CDLA-Permissive-2.0",
    "ISC",
    "MIT",
    "MIT-0",
    "MPL-2.0",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unlicense",
    "Zlib",
];

/// Whether an SPDX expression (`A OR B`, `A AND (B OR C)`, `A WITH X`, and
/// the old `A/B`) can be satisfied with allowed licences only.
fn allowed(expression: &str) -> bool {
    let spaced = expression
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut at = 0;
    let ok = or_expression(&tokens, &mut at);
    ok && at == tokens.len()
}

fn or_expression(tokens: &[&str], at: &mut usize) -> bool {
    let mut any = and_expression(tokens, at);
    while tokens.get(*at) == Some(&"OR") {
        *at += 1;
        any |= and_expression(tokens, at);
    }
    any
}

fn and_expression(tokens: &[&str], at: &mut usize) -> bool {
    let mut all = licence(tokens, at);
    while tokens.get(*at) == Some(&"AND") {
        *at += 1;
        all &= licence(tokens, at);
    }
    all
}

fn licence(tokens: &[&str], at: &mut usize) -> bool {
    let Some(&token) = tokens.get(*at) else {
        return false;
    };
    *at += 1;
    if token == "(" {
        let inner = or_expression(tokens, at);
        if tokens.get(*at) != Some(&")") {
            return false;
        }
        *at += 1;
        return inner;
    }
    if tokens.get(*at) == Some(&"WITH") {
        // An exception only ever grants more (e.g. LLVM-exception).
        *at += 2;
    }
    ALLOWED.contains(&token)
}

#[test]
fn spdx_expressions_are_read_as_cargo_writes_them() {
    assert!(allowed("MIT OR Apache-2.0"));
    assert!(allowed("MIT/Apache-2.0"));
    assert!(allowed("(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(allowed(
        "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"
    ));
    assert!(allowed("GPL-3.0 OR MIT"), "one allowed choice is enough");
    assert!(!allowed("GPL-3.0"));
    assert!(
        !allowed("MIT AND GPL-3.0"),
        "every part of an AND must be allowed"
    );
    assert!(!allowed("(MIT OR Apache-2.0"));
    assert!(!allowed(""));
}

#[test]
fn every_dependency_has_an_allowed_licence() {
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc runs")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
    .expect("rustc names its host");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let in_build: std::collections::HashSet<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|node| node["id"].as_str())
        .collect();
    let mut checked = 0;
    let mut refused = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        if !in_build.contains(package["id"].as_str().unwrap()) || package["name"] == "herald" {
            continue;
        }
        checked += 1;
        let licence = package["license"].as_str().unwrap_or("");
        if !allowed(licence) {
            refused.push(format!(
                "{} {}: {licence:?}",
                package["name"], package["version"]
            ));
        }
    }
    assert!(checked > 100, "the whole graph was read: {checked} crates");
    assert!(
        refused.is_empty(),
        "licences not on the allow-list: {refused:#?}"
    );
}
