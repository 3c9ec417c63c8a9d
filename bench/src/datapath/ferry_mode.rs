//! The `ferry` mode of the datapath benchmark: two containers created by ferry's agents, one on
//! [`HOST_A`](super::HOST_A), one on [`HOST_B`](super::HOST_B), through the lab's gateway
//! registry exactly as an orchestrator would. The rest of the benchmark only sees the [`Pair`]
//! (two namespace paths and addresses) and calls [`fill_map`] once, after the ferry rounds.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use ferry_overlay::netns::run_in;

use super::{BenchError, Endpoint, HOST_A, HOST_B, Pair};
use ferry_lab::Lab;

/// Name of the agent-less host that holds the filler endpoints.
const PHANTOM: &str = "bench-phantom";

fn overlay_addr(lab: &Lab, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(lab.topology().overlay_cidr.network()) + offset)
}

/// Creates container A on `HOST_A` and container B on `HOST_B` (`<overlay>.1.10` and
/// `<overlay>.2.10`) and returns their namespaces and overlay addresses.
pub fn setup(lab: &Lab) -> Result<Pair, BenchError> {
    let a_ip = overlay_addr(lab, 0x0000_010a);
    let b_ip = overlay_addr(lab, 0x0000_020a);
    let a = lab.add_container(HOST_A, a_ip)?;
    let b = lab.add_container(HOST_B, b_ip)?;
    Ok(Pair {
        a: Endpoint {
            netns: a,
            ip: a_ip.into(),
        },
        b: Endpoint {
            netns: b,
            ip: b_ip.into(),
        },
    })
}

/// The same two containers over their IPv6 addresses (the lab's overlay is dual-stack).
pub fn ipv6_pair(lab: &Lab, pair: &Pair) -> Result<Pair, BenchError> {
    let prefix = lab
        .topology()
        .overlay6_cidr
        .ok_or_else(|| BenchError::failed("the lab's overlay has no IPv6 prefix"))?;
    let v6 = |e: &Endpoint| -> Result<Endpoint, BenchError> {
        let std::net::IpAddr::V4(v4) = e.ip else {
            return Err(BenchError::failed(format!("{} is not IPv4", e.ip)));
        };
        Ok(Endpoint {
            netns: e.netns.clone(),
            ip: ferry_config::overlay_ipv6(prefix, v4).into(),
        })
    };
    Ok(Pair {
        a: v6(&pair.a)?,
        b: v6(&pair.b)?,
    })
}

/// Registers `n` more endpoints (on a host that runs no agent, so they are `REMOTE` entries
/// that the measured traffic never matches) and waits until the agents of both measured hosts
/// hold them. Needs an overlay of at least /15 (the filler lives in its second /16).
pub fn fill_map(lab: &Lab, n: usize) -> Result<(), BenchError> {
    let cidr = lab.topology().overlay_cidr;
    if cidr.prefix_len() > 15 {
        return Err(BenchError::failed(format!(
            "overlay {cidr} is too small for {n} filler endpoints (need /15 or larger)"
        )));
    }
    let n = u32::try_from(n).map_err(|_| BenchError::failed("too many endpoints"))?;
    let first = overlay_addr(lab, 0x0001_0000);
    let phantom_overlay = Ipv4Addr::from(u32::from(cidr.broadcast()) - 55);
    let added = lab
        .api(move |c| async move {
            c.register_host(&ferry_api::HostInfo {
                name: PHANTOM.into(),
                vtep: Ipv4Addr::new(198, 18, 254, 254),
                overlay_ip: phantom_overlay,
                role: ferry_api::HostRole::Host,
                active_since: None,
            })
            .await?;
            let specs: Vec<ferry_api::EndpointSpec> = (0..n)
                .map(|i| ferry_api::EndpointSpec {
                    ip: Ipv4Addr::from(u32::from(first) + i),
                    host: PHANTOM.into(),
                    mac: None,
                })
                .collect();
            c.add_endpoints(&specs).await.map(|v| v.len())
        })?
        .map_err(|e| BenchError::failed(format!("registering {n} endpoints: {e}")))?;
    eprintln!("  registered {added} filler endpoints; waiting for the agents to apply them");
    let t0 = Instant::now();
    for host in [HOST_A, HOST_B] {
        loop {
            let have = endpoints_gauge(lab, host).unwrap_or(0);
            if have >= u64::from(n) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                return Err(BenchError::failed(format!(
                    "{host}'s agent holds {have} endpoints after 300 s, want {n}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!(
        "  both agents hold {n}+ endpoints ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `ferry_endpoints` of a host's agent (its metrics endpoint inside the host's namespace).
fn endpoints_gauge(lab: &Lab, host: &str) -> Option<u64> {
    let addr: SocketAddr = ferry_config::DEFAULT_METRICS_LISTEN.parse().ok()?;
    let answer = run_in(&lab.netns(host), move || {
        ferry_api::transport::Request::get("/metrics")
            .timeout(Duration::from_secs(10))
            .send_blocking(addr)
    })
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&answer.body);
    text.lines()
        .find(|l| l.starts_with("ferry_endpoints{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
