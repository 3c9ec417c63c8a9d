//! `ferry-cni`: the CNI plugin binary (see the `ferry_cni` library).

use std::io::{Read as _, Write as _};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(ferry_cni::spec::MAX_CONFIG_LEN as u64 + 1)
        .read_to_end(&mut stdin);
    let out = match read {
        Ok(_) if stdin.len() > ferry_cni::spec::MAX_CONFIG_LEN => too_long(&stdin),
        Ok(_) => ferry_cni::plugin::run(
            &|k| std::env::var(k).ok(),
            &stdin,
            &ferry_cni::plugin::UnixAgent::default(),
        ),
        Err(e) => io_error(&stdin, &e),
    };
    if out.status != 0 {
        // The runtime shows stdout's error; stderr is for whoever runs it by hand.
        eprintln!("ferry-cni: {}", out.stdout.trim());
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.status);
}

fn too_long(stdin: &[u8]) -> ferry_cni::plugin::Outcome {
    let e = ferry_cni::CniError::new(
        ferry_cni::ErrorCode::Decode,
        format!(
            "the network configuration is longer than {} bytes",
            ferry_cni::spec::MAX_CONFIG_LEN
        ),
    );
    failed(stdin, &e)
}

fn io_error(stdin: &[u8], e: &std::io::Error) -> ferry_cni::plugin::Outcome {
    let e = ferry_cni::CniError::new(ferry_cni::ErrorCode::Io, format!("reading stdin: {e}"));
    failed(stdin, &e)
}

fn failed(stdin: &[u8], e: &ferry_cni::CniError) -> ferry_cni::plugin::Outcome {
    let v = ferry_cni::spec::answer_version(stdin);
    ferry_cni::plugin::Outcome {
        stdout: format!("{}\n", e.to_json(v.as_str())),
        status: 1,
    }
}
