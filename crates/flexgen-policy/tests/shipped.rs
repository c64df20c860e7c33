//! Every policy and hardware profile shipped under policies/ parses, validates and survives a TOML
//! round trip; broken or old files give errors that name the file and the field.

use std::path::{Path, PathBuf};

use flexgen_policy::{Error, HardwareProfile, Policy};

fn files(sub: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies").join(sub);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_policies_parse_and_round_trip() {
    let all = files("");
    assert!(all.len() >= 9, "{all:?}");
    for path in all {
        let p = Policy::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Policy::from_toml_str(&p.to_toml()).unwrap(), p, "{}", path.display());
    }
}

#[test]
fn shipped_hardware_profiles_parse_and_round_trip() {
    let all = files("hardware");
    let names: Vec<String> =
        all.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["t4-16gb", "rtx3090", "h200"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    for path in all {
        let h = HardwareProfile::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(h.gpu.is_some(), "{}", path.display());
        assert_eq!(HardwareProfile::from_toml_str(&h.to_toml()).unwrap(), h);
    }
}

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn a_bad_policy_file_names_the_file_and_field() {
    let text = std::fs::read_to_string(files("")[0].clone()).unwrap();
    let (_d, p) = write(&text.replace("cpu = 0.0, disk = 0.0", "cpu = 10.0, disk = 0.0"));
    let err = Policy::from_toml_file(&p).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.toml") && msg.contains("gpu+cpu+disk") && msg.contains("110"),
        "{msg}"
    );
    assert!(matches!(err.root(), Error::Invalid { .. }));
}

#[test]
fn an_old_profile_is_refused_with_the_fix() {
    let text = std::fs::read_to_string(&files("hardware")[0]).unwrap();
    let (_d, p) = write(&text.replace("version = 1", "version = 0"));
    let msg = HardwareProfile::from_toml_file(&p).unwrap_err().to_string();
    assert!(
        msg.contains("bad.toml") && msg.contains("version") && msg.contains("flexgen-profile"),
        "{msg}"
    );
}

#[test]
fn a_profile_missing_a_rate_names_it() {
    let text = std::fs::read_to_string(&files("hardware")[0]).unwrap();
    let kept: String =
        text.lines().filter(|l| !l.starts_with("hbm_bytes_per_s")).fold(String::new(), |acc, l| {
            acc + l
                + "
"
        });
    let (_d, p) = write(&kept);
    let msg = HardwareProfile::from_toml_file(&p).unwrap_err().to_string();
    assert!(msg.contains("hbm_bytes_per_s"), "{msg}");
    let (_d, p) = write(&text.replace("read_bytes_per_s = ", "read_bytes_per_s = -"));
    let msg = HardwareProfile::from_toml_file(&p).unwrap_err().to_string();
    assert!(msg.contains("disk.read_bytes_per_s"), "{msg}");
}

#[test]
fn a_profile_with_no_cores_is_refused_naming_the_field() {
    let path = files("hardware").into_iter().find(|p| p.ends_with("h200.toml")).unwrap();
    let text = std::fs::read_to_string(path).unwrap().replace("cores = 16", "cores = 0");
    let e = HardwareProfile::from_toml_str(&text).unwrap_err().to_string();
    assert!(e.contains("cpu.cores") && e.contains("at least one core"), "{e}");
}

#[test]
fn a_compute_capability_says_whether_the_gpu_has_tensor_cores_and_a_bad_one_is_refused() {
    let text = |name: &str| {
        let path = files("hardware").into_iter().find(|p| p.ends_with(name)).unwrap();
        std::fs::read_to_string(path).unwrap()
    };
    let tc = |t: &str| HardwareProfile::from_toml_str(t).unwrap().gpu.unwrap().tensor_cores();
    assert!(tc(&text("h200.toml")) && tc(&text("rtx3090.toml")) && !tc(&text("t4-16gb.toml")));
    // A profile written before the key: taken as a GPU that has them.
    let h200 = text("h200.toml");
    assert!(tc(&h200.replace("compute_capability = \"9.0\"\n", "")));
    let e = HardwareProfile::from_toml_str(&h200.replace("\"9.0\"", "\"sm_90\"")).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("gpu.compute_capability") && e.contains("major.minor"), "{e}");
}
