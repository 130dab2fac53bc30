//! The module map in docs/ARCHITECTURE.md is true: it lists every module of `src/`, from the
//! top, and each module uses only modules listed after it. So there is no circle between
//! modules, and none reaches "up". Read from the source, as a newcomer would: every
//! `crate::<module>` outside comments and unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names: `crate::x` and `use crate::{x, y::z}`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at depth one of the braced group.
            let mut depth = 1;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if start && depth == 1 && !c.is_whitespace() => {
                        found.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

/// Module -> the modules it uses, from `src/`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let used = uses(&code(&fs::read_to_string(file).unwrap()));
        graph.entry(module).or_default().extend(used);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for (module, used) in graph.iter_mut() {
        used.retain(|other| other != module && modules.contains(other));
    }
    graph
}

/// The modules of the table in docs/ARCHITECTURE.md, in its order (`| \`name\` |` or
/// `| \`name/\` |` rows).
fn documented() -> Vec<String> {
    let text = fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| name.trim_end_matches('/').to_string())
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

#[test]
fn the_module_map_is_complete_and_every_module_uses_only_those_below_it() {
    let graph = graph();
    assert!(graph.len() > 20, "found only {:?} under src/", graph.keys());
    let order = documented();
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    assert_eq!(
        listed.len(),
        order.len(),
        "docs/ARCHITECTURE.md lists a module twice: {order:?}"
    );
    assert_eq!(
        listed, modules,
        "docs/ARCHITECTURE.md's module table and src/ disagree (listed, found)"
    );
    let position: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(module, used)| {
            used.iter()
                .filter(|other| position[other.as_str()] < position[module.as_str()])
                .map(move |other| format!("{module} uses {other}, which is listed above it"))
        })
        .collect();
    assert!(
        upward.is_empty(),
        "docs/ARCHITECTURE.md lists modules from the top, each using only those below it:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_use_scanner_reads_grouped_and_nested_imports() {
    let text = "use crate::{db::{self, Db}, error::Result};\nfn f() { crate::paths::x(); }";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(found, ["db", "error", "paths"]);
    assert!(uses(&code("// crate::hidden\nfn g() {}")).is_empty());
}
