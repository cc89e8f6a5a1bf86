//! The layering of `src/` (see the `# Layout` section of `src/lib.rs` and
//! `docs/ARCHITECTURE.md`), checked on the source text:
//! - no product code imports from a layer above its own (every `crate::<module>` path, and
//!   every `super::` path that climbs to the crate root, is resolved to its top-level
//!   module);
//! - the top-level modules import each other without a cycle (so no import circle spans
//!   more than one layer; within a layer, imports run one way);
//! - only `contract` (and the `backend` it drives) names a script or runs one: the typed
//!   Lua contract is the one place that knows KEYS, ARGV and replies.
//!
//! Test code (`#[cfg(test)]` modules and the files they are) may reach across layers: it
//! checks layers together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module and its layer, bottom (0) to top.
const LAYERS: &[(&str, u8, &str)] = &[
    ("config", 0, "leaves"),
    ("obs", 0, "leaves"),
    ("domain", 1, "domain"),
    ("backend", 2, "backend"),
    ("contract", 3, "contracts"),
    ("store", 3, "contracts"),
    ("stock", 4, "services"),
    ("catalog", 4, "services"),
    ("coupons", 4, "services"),
    ("persist", 5, "off the request path"),
    ("recovery", 5, "off the request path"),
    ("notify", 5, "off the request path"),
    ("jobs", 5, "off the request path"),
    ("api", 6, "api"),
    ("http", 7, "http"),
    ("gateway", 8, "root"),
    ("cli", 8, "root"),
];

fn layer(module: &str) -> Option<(u8, &'static str)> {
    LAYERS
        .iter()
        .find(|(m, _, _)| *m == module)
        .map(|(_, l, name)| (*l, *name))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A source file: its module path below the crate root, and its product lines (number,
/// text), test modules left out.
struct File {
    rel: String,
    module: Vec<String>,
    lines: Vec<(usize, String)>,
}

/// The module path of a file (`src/api/claim.rs` -> `api::claim`, `src/api/mod.rs` -> `api`).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// Files that are test modules: `#[cfg(test)] mod x;` declares `x.rs` (or `x/mod.rs`).
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).expect("read source");
        let dir = if f.ends_with("mod.rs") || f.ends_with("lib.rs") {
            f.parent().unwrap().to_path_buf()
        } else {
            f.with_extension("")
        };
        let mut cfg_test = false;
        for line in text.lines() {
            let t = line.trim();
            if t == "#[cfg(test)]" {
                cfg_test = true;
                continue;
            }
            if cfg_test && let Some(name) = t.strip_prefix("mod ").and_then(|r| r.strip_suffix(';'))
            {
                out.insert(dir.join(format!("{name}.rs")));
                out.insert(dir.join(name).join("mod.rs"));
            }
            cfg_test = false;
        }
    }
    out
}

fn product_files() -> Vec<File> {
    let root = src();
    let mut paths = Vec::new();
    rust_files(&root, &mut paths);
    paths.sort();
    let tests = test_only_files(&paths);
    let mut out = Vec::new();
    for p in paths {
        if tests.contains(&p) {
            continue;
        }
        let rel = p.strip_prefix(&root).unwrap().to_path_buf();
        let text = std::fs::read_to_string(&p).expect("read source");
        let mut lines = Vec::new();
        let mut prev_cfg_test = false;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            // the test module (inline) ends the product code of a file
            if prev_cfg_test && t.starts_with("mod ") && t.ends_with('{') {
                lines.pop();
                break;
            }
            prev_cfg_test = t == "#[cfg(test)]";
            if t.starts_with("//") {
                continue;
            }
            lines.push((i + 1, line.to_string()));
        }
        out.push(File {
            rel: format!("src/{}", rel.display()),
            module: module_of(&rel),
            lines,
        });
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a line names through `crate::` or a `super::` path that climbs to
/// the crate root from a module at `depth`.
fn imported_modules(line: &str, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    let code = line.split("//").next().unwrap_or(line);
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        let after = &rest[i + "crate::".len()..];
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            let id = ident_at(after);
            if !id.is_empty() {
                out.push(id.to_string());
            }
            // `use crate::{a, b}`
            if let Some(group) = after.strip_prefix('{') {
                for part in group.split('}').next().unwrap_or("").split(',') {
                    let id = ident_at(part.trim());
                    if !id.is_empty() {
                        out.push(id.to_string());
                    }
                }
            }
        }
        rest = after;
    }
    let mut rest = code;
    while let Some(i) = rest.find("super::") {
        let before = rest[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            rest = &rest[i + 7..];
            continue;
        }
        let mut after = &rest[i..];
        let mut ups = 0;
        while let Some(r) = after.strip_prefix("super::") {
            ups += 1;
            after = r;
        }
        if ups >= depth {
            let id = ident_at(after);
            if !id.is_empty() {
                out.push(id.to_string());
            }
        }
        rest = after;
    }
    out
}

#[test]
fn no_import_runs_up_a_layer_and_no_cycle_between_modules() {
    let files = product_files();
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut violations = Vec::new();
    let mut unknown = BTreeSet::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(top) = f.module.first() else {
            continue; // lib.rs, main.rs: the crate root declares the modules
        };
        let Some((own, own_name)) = layer(top) else {
            unknown.insert(format!("{} (module {top})", f.rel));
            continue;
        };
        for (n, line) in &f.lines {
            for m in imported_modules(line, f.module.len()) {
                if m == *top {
                    continue;
                }
                let Some((theirs, their_name)) = layer(&m) else {
                    continue; // a name under the crate root that is not a module
                };
                graph.entry(top.clone()).or_default().insert(m.clone());
                if theirs > own || (own == 0 && theirs == 0) {
                    violations.push(format!(
                        "{}:{n}: `{top}` ({own_name}, layer {own}) imports `{m}` \
                         ({their_name}, layer {theirs}): {}",
                        f.rel,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules without a layer (add them to LAYERS and to the Layout docs): {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "imports that run up a layer (or between the leaves):\n{}",
        violations.join("\n")
    );
    // No cycle between top-level modules (within a layer, imports run one way).
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((m, path)) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                assert!(
                    next != start,
                    "import cycle: {} -> {start}",
                    path.join(" -> ")
                );
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
}

#[test]
fn only_the_contract_runs_scripts() {
    let mut found = Vec::new();
    for f in product_files() {
        let owner = f.module.first().map(String::as_str);
        if matches!(owner, Some("contract" | "backend")) {
            continue;
        }
        for (n, line) in &f.lines {
            if line.contains("Script::") || line.contains(".eval(") {
                found.push(format!("{}:{n}: {}", f.rel, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "scripts named or run outside src/contract (go through its typed modules):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_must() {
    // `crate::` paths, grouped imports and `super::` paths that reach the crate root
    assert_eq!(imported_modules("use crate::http::App;", 2), ["http"]);
    assert_eq!(
        imported_modules("use crate::{api, stock::Stock};", 1),
        ["api", "stock"]
    );
    assert_eq!(
        imported_modules("use super::super::http::App;", 2),
        ["http"]
    );
    assert!(imported_modules("use super::keys::SlotKeys;", 2).is_empty());
    assert_eq!(imported_modules("use super::api::Api;", 1), ["api"]);
    assert!(imported_modules("let x = mycrate::http;", 1).is_empty());
    assert_eq!(module_of(Path::new("api/claim.rs")), ["api", "claim"]);
    assert_eq!(module_of(Path::new("api/mod.rs")), ["api"]);
    assert_eq!(module_of(Path::new("cli.rs")), ["cli"]);
}
