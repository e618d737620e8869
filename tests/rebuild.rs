//! `drctl registry rebuild`: the registry comes back from the repository's manifests alone.

mod common;

use common::{assert_same_tree, find_file, restored, Sandbox};

fn ids(values: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = values
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn rebuild_records_complete_backups_and_skips_incomplete_ones() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/a.txt"), b"alpha").unwrap();
    sb.files_policy("p", &[&src]);
    let first = sb.backup("p");
    std::fs::write(src.join("b.txt"), vec![7u8; 300_000]).unwrap();
    let second = sb.backup("p");
    let broken = sb.backup("p");
    let data = find_file(&sb.backup_dir("p", &broken), |n| n.starts_with("data."));
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 1)
        .unwrap();

    // The registry is lost.
    std::fs::remove_file(sb.path().join("registry.db")).unwrap();
    sb.run(&["list"]).code(10);

    let dry = sb
        .run(&["--json", "registry", "rebuild", "--dry-run"])
        .ok()
        .json();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(ids(&dry[0]["added"]), expected);
    let skipped = dry[0]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0]["prefix"].as_str().unwrap().contains(&broken));
    assert!(skipped[0]["reason"].as_str().unwrap().contains("bytes"));
    sb.run(&["list"]).code(10);

    let done = sb.run(&["--json", "registry", "rebuild"]).ok().json();
    assert_eq!(ids(&done[0]["added"]), expected);
    let records = sb.records();
    let listed: Vec<&str> = records
        .iter()
        .map(|r| r["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [second.as_str(), first.as_str()]);
    assert!(records.iter().all(|r| r["status"] == "completed"));

    sb.run(&["verify", "--all", "--deep"]).ok();
    let target = sb.path().join("restore");
    sb.run(&[
        "restore",
        "-p",
        "p",
        "-b",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target, &src));

    let again = sb.run(&["--json", "registry", "rebuild"]).ok().json();
    assert_eq!(ids(&again[0]["added"]), Vec::<String>::new());
    assert_eq!(ids(&again[0]["present"]), expected);
}
