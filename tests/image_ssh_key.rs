//! The user's SSH key lives in the XDG data directory: `$XDG_DATA_HOME`
//! when set (absolute), else `$HOME/.local/share`. Alone in its test binary
//! because it changes the process environment.

#[test]
fn user_key_follows_xdg_data_home_then_home() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HOME", home.path());
    std::env::set_var("XDG_DATA_HOME", data.path());
    let key = vmlab::image::user_key().expect("ssh-keygen (openssh-client) makes the key");
    assert_eq!(key.private_key, data.path().join("vmlab/ssh/id_ed25519"));
    assert_eq!(vmlab::image::user_key().unwrap(), key, "made once");

    std::env::remove_var("XDG_DATA_HOME");
    let fallback = vmlab::image::user_key().unwrap();
    assert_eq!(
        fallback.private_key,
        home.path().join(".local/share/vmlab/ssh/id_ed25519")
    );
    assert_ne!(
        fallback.public_key, key.public_key,
        "another data dir, another key"
    );
    vmlab::image::GuestIdentity::new("vm1", &fallback.public_key).unwrap();
}
