//! `hvisor-sim`: see the library documentation for the command line and the report format.

use clap::Parser;

fn main() {
    let args = hvisor_sim::run::Args::parse();
    std::process::exit(hvisor_sim::run::main(args));
}
