//! `ferry-lab links show|check`: a lab's shaped links, their counters, and a measurement of
//! what they deliver against what they are configured to ([`ferry_bench::links`]).

use ferry_lab::Lab;

use crate::{cli::LinksAction, commands::pick};

pub fn run(action: LinksAction) -> anyhow::Result<i32> {
    match action {
        LinksAction::Show { lab, json } => {
            let lab = Lab::attach(&pick(lab)?)?;
            let stats = lab.link_stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", ferry_bench::links::show_table(lab.links(), &stats));
            }
            Ok(0)
        }
        LinksAction::Check { lab, json, opts } => {
            let lab = Lab::attach(&pick(lab)?)?;
            let report = ferry_bench::links::check(&lab, &opts)?;
            ferry_bench::links::print(json, &report)?;
            Ok(if report.ok { 0 } else { 1 })
        }
    }
}
