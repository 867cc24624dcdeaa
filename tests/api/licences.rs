//! Dependencies: every crate built into Herald (for this platform) is under
//! licences on the allow-list below, read from `cargo metadata`, and none
//! is at a version a RustSec advisory names as vulnerable. The advisories come from `tests/data/rustsec.json`, an
//! extract of the RustSec database committed with the code (this
//! workplace cannot reach GitHub at test time); refresh it with
//! `scripts/update-advisories.py` from a checkout of rustsec/advisory-db.

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

/// A crate built into Herald.
struct Built {
    name: String,
    version: String,
    licence: String,
}

/// The crates built into Herald on this platform, dev-dependencies
/// included, as `cargo tree` resolves features: what `Cargo.lock` holds
/// only for features or targets not built here (sqlx's MySQL driver, say)
/// is left out, as `cargo metadata`'s coarser resolve would not.
fn built_packages() -> Vec<Built> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "-e",
            "normal,build,dev",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}|{l}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = std::collections::HashSet::new();
    let mut packages = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        // `name vX.Y.Z [(path or proc-macro)]|licence [(*)]`
        let Some((package, licence)) = line.split_once('|') else {
            continue;
        };
        let mut words = package.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        let version = version.trim_start_matches('v');
        if name == "herald" || !seen.insert((name.to_owned(), version.to_owned())) {
            continue;
        }
        packages.push(Built {
            name: name.to_owned(),
            version: version.to_owned(),
            licence: licence.trim_end_matches("(*)").trim().to_owned(),
        });
    }
    assert!(
        packages.len() > 100,
        "the whole graph was read: {} crates",
        packages.len()
    );
    packages
}

#[test]
fn every_dependency_has_an_allowed_licence() {
    let mut refused = Vec::new();
    for package in built_packages() {
        if !allowed(&package.licence) {
            refused.push(format!(
                "{} {}: {:?}",
                package.name, package.version, package.licence
            ));
        }
    }
    assert!(
        refused.is_empty(),
        "licences not on the allow-list: {refused:#?}"
    );
}

/// Whether `version` of `package` is inside `advisory`'s affected range on
/// Linux: not withdrawn, and neither patched nor unaffected.
fn affected(advisory: &Value, package: &str, version: &semver::Version) -> bool {
    let ranges = |key: &str| -> Vec<semver::VersionReq> {
        advisory[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| semver::VersionReq::parse(r.as_str().unwrap()).unwrap())
            .collect()
    };
    let os = advisory["os"].as_array().unwrap();
    advisory["package"] == package
        && advisory["withdrawn"].is_null()
        && (os.is_empty() || os.iter().any(|o| o == "linux"))
        && !ranges("patched")
            .iter()
            .chain(ranges("unaffected").iter())
            .any(|req| req.matches(version))
}

fn advisories() -> Vec<Value> {
    let db: Value = serde_json::from_str(include_str!("../data/rustsec.json")).unwrap();
    db["advisories"].as_array().unwrap().clone()
}

#[test]
fn advisory_ranges_are_read_as_rustsec_writes_them() {
    let db = advisories();
    let advisory = db
        .iter()
        .find(|a| a["id"] == "RUSTSEC-2020-0105")
        .expect("abi_stable's advisory is in the extract");
    let v = |s: &str| semver::Version::parse(s).unwrap();
    assert!(affected(advisory, "abi_stable", &v("0.9.0")));
    assert!(!affected(advisory, "abi_stable", &v("0.9.1")));
    assert!(!affected(advisory, "abi_stable", &v("1.0.0")));
    assert!(!affected(advisory, "other", &v("0.9.0")));
    // Windows-only advisories do not apply here.
    let windows = db.iter().find(|a| a["id"] == "RUSTSEC-2016-0002").unwrap();
    assert!(!affected(windows, "hyper", &v("0.9.0")));
}

#[test]
fn no_locked_dependency_has_a_known_vulnerability() {
    let db = advisories();
    assert!(db.len() > 1000, "the extract is whole: {}", db.len());
    let mut vulnerable = Vec::new();
    let mut notices = Vec::new();
    for package in built_packages() {
        let name = package.name.as_str();
        let version = semver::Version::parse(&package.version).unwrap();
        for advisory in db.iter().filter(|a| affected(a, name, &version)) {
            let line = format!("{} {name} {version}", advisory["id"].as_str().unwrap());
            match advisory["informational"].as_str() {
                // Unmaintained or unsound crates: worth knowing, not a hole.
                Some(kind) => notices.push(format!("{line} ({kind})")),
                None => vulnerable.push(line),
            }
        }
    }
    if !notices.is_empty() {
        eprintln!("informational advisories: {notices:#?}");
    }
    assert!(
        vulnerable.is_empty(),
        "vulnerable dependencies: {vulnerable:#?}"
    );
}
