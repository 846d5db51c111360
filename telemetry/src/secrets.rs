//! Secrets come from the environment only. A value on the command line
//! shows in `ps` and `/proc/PID/cmdline` to every user of the machine, so a
//! binary parses its arguments through [`parse`], which refuses the flags
//! that carry one and names the variable to set instead.

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, Parser};

/// The command line of this process as `P`; exits 2 (as clap does for any
/// bad argument) when one of `secrets` (argument ids: the field names) is
/// given there rather than in its environment variable.
pub fn parse<P: Parser>(secrets: &[&str]) -> P {
    try_parse_from(std::env::args_os(), secrets).unwrap_or_else(|e| e.exit())
}

/// [`parse`] over `args`, returning the error.
pub fn try_parse_from<P, I, T>(args: I, secrets: &[&str]) -> Result<P, clap::Error>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = P::command();
    let matches = command.try_get_matches_from_mut(args)?;
    if let Some(message) = secret_on_command_line(&command, &matches, secrets) {
        return Err(command.error(clap::error::ErrorKind::ArgumentConflict, message));
    }
    P::from_arg_matches(&matches)
}

fn secret_on_command_line(command: &Command, matches: &ArgMatches, secrets: &[&str]) -> Option<String> {
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if secrets.contains(&id) && matches.value_source(id) == Some(ValueSource::CommandLine) {
            let flag = arg.get_long().unwrap_or(id);
            let variable = arg
                .get_env()
                .map(|env| env.to_string_lossy().into_owned())
                .unwrap_or_else(|| id.to_uppercase());
            return Some(format!(
                "--{flag} carries a secret, and the command line shows in `ps` to every user of the machine: \
                 set {variable} in the environment instead"
            ));
        }
    }
    let (name, sub) = matches.subcommand()?;
    secret_on_command_line(command.find_subcommand(name)?, sub, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Run {
            #[arg(long, env = "TEST_SECRETS_DATABASE_URL")]
            database_url: Option<String>,
            #[arg(long)]
            port: Option<u16>,
        },
    }

    #[test]
    fn a_secret_on_the_command_line_is_refused_by_name_at_any_depth() {
        let error = try_parse_from::<Cli, _, _>(
            ["x", "run", "--database-url", "postgres://u:pw@db/x"],
            &["database_url"],
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("--database-url carries a secret"), "{message}");
        assert!(
            message.contains("set TEST_SECRETS_DATABASE_URL in the environment"),
            "{message}"
        );
        assert!(!message.contains("pw@"), "the secret is not echoed: {message}");
        assert_eq!(error.exit_code(), 2);

        let parsed = try_parse_from::<Cli, _, _>(["x", "run", "--port", "9"], &["database_url"]).unwrap();
        assert!(matches!(parsed.command, Sub::Run { port: Some(9), .. }));
    }
}
