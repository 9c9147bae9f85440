//! The module graph is the one `src/lib.rs` states: each top-level module uses only the modules
//! its row of the map names (and `util`), so the graph stays a DAG as the code grows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The map's rows: module → the modules it may use.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string("src/lib.rs").expect("src/lib.rs");
    let mut rows = BTreeMap::new();
    let mut above: Vec<String> = Vec::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        if cells.len() < 3 || cells[0].starts_with("module") || cells[0].starts_with("---") {
            continue;
        }
        let name = cells[0]
            .trim_matches(|c: char| c == '[' || c == ']' || c == '`')
            .to_string();
        let uses = cells[2].trim_end_matches(" |").trim();
        let set: BTreeSet<String> = match uses {
            "none" => BTreeSet::new(),
            "all of the above" => above.iter().cloned().collect(),
            list => list
                .split(',')
                .map(|u| u.split_whitespace().next().unwrap_or("").to_string())
                .collect(),
        };
        for u in &set {
            assert!(
                above.contains(u),
                "lib.rs map: {name} uses {u}, which is not above it"
            );
        }
        above.push(name.clone());
        rows.insert(name, set);
    }
    assert!(
        rows.len() >= 10,
        "the map in src/lib.rs has {} rows",
        rows.len()
    );
    rows
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

/// The top-level modules a file names as `crate::NAME`, outside comments.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_what_the_map_allows() {
    let allowed = allowed();
    let mut files = Vec::new();
    rust_files(Path::new("src"), &mut files);
    let mut broken = Vec::new();
    for f in files {
        let rel = f.strip_prefix("src").expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a file name");
        let Some(may) = allowed.get(&top) else {
            // lib.rs, main.rs and the agent binary sit on top of everything.
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read source");
        for u in uses(&text) {
            if u != top && u != "util" && !may.contains(&u) {
                broken.push(format!("{}: {top} uses {u}", f.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the map:\n{}",
        broken.join("\n")
    );
}
