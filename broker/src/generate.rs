//! Man pages and shell completions made from the command-line definitions themselves, so they
//! cannot drift from what the binary accepts (`hvisor-broker generate man|completions DIR`,
//! run when packaging).

use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// `NAME.8` for the command and `NAME-SUB.8` for each subcommand.
    Man,
    /// Completions for bash, zsh and fish.
    Completions,
}

/// Section 8: system administration commands.
const SECTION: &str = "8";

pub fn write(what: What, cmd: clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match what {
        What::Man => man_pages(cmd, dir),
        What::Completions => completions(cmd, dir),
    }
}

fn man_pages(cmd: clap::Command, dir: &Path) -> Result<()> {
    // `help` has no page of its own: every page is the help.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    render(&cmd, &name, dir)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("{name}-{}", sub.get_name());
        render(&sub.clone().name(page.clone()), &page, dir)?;
    }
    Ok(())
}

fn render(cmd: &clap::Command, page: &str, dir: &Path) -> Result<()> {
    let path = dir.join(format!("{page}.{SECTION}"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .manual("System Administration")
        .source(format!("hvisor-broker {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
}

fn completions(mut cmd: clap::Command, dir: &Path) -> Result<()> {
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, dir)
            .with_context(|| format!("{shell} completions in {}", dir.display()))?;
    }
    Ok(())
}
