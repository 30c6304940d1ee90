//! Golden tests: `describe` of every file in topologies/ matches tests/golden/<name>.txt.
//! Regenerate with `UPDATE_GOLDEN=1 scripts/test` and review the diff.

use std::path::Path;

use readstate::topology::{describe, Topology};

#[test]
fn every_topology_file_matches_its_golden_description() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(root.join("topologies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let t = Topology::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let got = describe(&t);
        let golden = root.join("tests/golden").join(format!(
            "{}.txt",
            path.file_stem().unwrap().to_str().unwrap()
        ));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_GOLDEN=1", golden.display()));
        assert_eq!(got, want, "describe output of {} changed", path.display());
    }
    assert!(seen > 0, "no topology files found");
}
