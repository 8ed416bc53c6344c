//! Image commands beyond pull: import, tag, rm, prune, and images in `plan`.

mod common;
use common::*;

fn skopeo_copy(src: &str, dst: &str) {
    skopeo(&["copy", "--quiet", "--src-tls-verify=false", src, dst]);
}

#[test]
fn import_layouts_and_archives() {
    let layout = tempfile::tempdir().unwrap();
    let digest = write_layout(layout.path(), "t", &[busybox_layer()], &["/bin/sh"]);
    let state = tempfile::tempdir().unwrap();
    let dir = layout.path().to_str().unwrap();
    // a layout whose ref name is a bare tag needs --tag
    let out = berth(state.path(), &["image", "import", dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tag"));
    let out = ok(&berth(
        state.path(),
        &["image", "import", "--tag", "example.com/imp/dir:1", dir],
    ));
    assert!(out.contains(&digest), "{out}");
    // an OCI archive (tar) and a docker save archive, written by skopeo
    let work = tempfile::tempdir().unwrap();
    let oci_tar = work.path().join("oci.tar");
    skopeo_copy(
        &format!("oci:{dir}:t"),
        &format!("oci-archive:{}:example.com/imp/oci:2", oci_tar.display()),
    );
    ok(&berth(
        state.path(),
        &["image", "import", oci_tar.to_str().unwrap()],
    ));
    let docker_tar = work.path().join("docker.tar");
    skopeo_copy(
        &format!("oci:{dir}:t"),
        &format!(
            "docker-archive:{}:example.com/imp/docker:3",
            docker_tar.display()
        ),
    );
    ok(&berth(
        state.path(),
        &["image", "import", docker_tar.to_str().unwrap()],
    ));
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    let refs: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        refs,
        [
            "example.com/imp/dir:1",
            "example.com/imp/docker:3",
            "example.com/imp/oci:2"
        ]
    );
    for r in refs {
        assert_unpacked(state.path(), r);
    }
    // garbage is refused and changes nothing
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar at all").unwrap();
    let out = berth(state.path(), &["image", "import", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.tar"));
    assert_eq!(
        paths_in(&state.path().join("store/ingest")),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn tag_rm_and_prune() {
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "t", &[busybox_layer()], &["/bin/sh"]);
    let layout2 = tempfile::tempdir().unwrap();
    write_layout(
        layout2.path(),
        "t",
        &[LayerBuilder::new().file("only.txt", b"x", 0o644).build()],
        &["/x"],
    );
    let state = tempfile::tempdir().unwrap();
    ok(&berth(
        state.path(),
        &[
            "image",
            "import",
            "--tag",
            "example.com/a:1",
            layout.path().to_str().unwrap(),
        ],
    ));
    ok(&berth(
        state.path(),
        &[
            "image",
            "import",
            "--tag",
            "example.com/b:1",
            layout2.path().to_str().unwrap(),
        ],
    ));
    ok(&berth(
        state.path(),
        &["image", "tag", "example.com/a:1", "example.com/a:alias"],
    ));
    let out = ok(&berth(
        state.path(),
        &["image", "rm", "example.com/a:alias"],
    ));
    assert!(out.contains("untagged"), "{out}");
    // a container record using an image protects it from rm and prune
    let spec = berth::manifest::spec::ContainerSpec::with_image(
        "example.com/a:1",
        "example.com/a:1".parse().unwrap(),
    );
    let rec = berth::state::ContainerRecord {
        name: "web".into(),
        source: Default::default(),
        spec,
        image_digest: None,
        created_at: 1,
        stopped_by_user: false,
    };
    berth::state::StateDir::new(state.path())
        .write_record(berth::manifest::spec::Kind::Container, "web", &rec)
        .unwrap();
    let out = berth(state.path(), &["image", "rm", "example.com/a:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("used by container web"));
    let blobs_before = paths_in(&state.path().join("store/blobs/sha256")).len();
    let out = ok(&berth(state.path(), &["image", "prune", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["removed"], serde_json::json!(["example.com/b:1"]));
    assert!(v["bytes_freed"].as_u64().unwrap() > 0);
    assert_eq!(
        paths_in(&state.path().join("store/blobs/sha256")).len(),
        blobs_before - 3
    );
    // without the container, rm removes the image and its blobs and snapshots
    berth::state::StateDir::new(state.path())
        .remove_record(berth::manifest::spec::Kind::Container, "web")
        .unwrap();
    let out = ok(&berth(state.path(), &["image", "rm", "example.com/a:1"]));
    assert!(out.contains("removed"), "{out}");
    assert!(paths_in(&state.path().join("store/blobs/sha256")).is_empty());
    assert!(paths_in(&state.path().join("snapshots")).is_empty());
    let out = berth(state.path(), &["image", "rm", "example.com/a:1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the store"));
}

#[test]
fn plan_shows_image_pulls() {
    let reg = Registry::start();
    let r = format!("{}/plan/app:1", reg.addr);
    push_image(&r, &[]);
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("i.toml");
    let d = dir.path().to_str().unwrap();
    std::fs::write(&m, format!("[image.app]\nref = \"{r}\"\n")).unwrap();
    let out = ok(&berth(state.path(), &["plan", d]));
    assert!(
        out.contains(&format!("+ image.app (pull {r}: not in the store)")),
        "{out}"
    );
    ok(&berth(state.path(), &["image", "pull", "-q", &r]));
    let out = berth(state.path(), &["plan", "--detailed-exitcode", d]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // pull = "always": the tag moves on the registry
    std::fs::write(
        &m,
        format!("[image.app]\nref = \"{r}\"\npull = \"always\"\n"),
    )
    .unwrap();
    assert_eq!(
        berth(state.path(), &["plan", "--detailed-exitcode", d])
            .status
            .code(),
        Some(0)
    );
    push_image(&r, &[LayerBuilder::new().file("v2", b"2", 0o644).build()]);
    let out = berth(state.path(), &["plan", "--detailed-exitcode", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("~ image.app (pull"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // pull = "never" and absent: an error
    std::fs::write(
        &m,
        "[image.app]\nref = \"example.com/absent:1\"\npull = \"never\"\n",
    )
    .unwrap();
    let out = berth(state.path(), &["plan", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pull = \"never\""));
}
