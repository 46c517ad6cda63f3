//! A relay in a process of its own, for the suite to SIGKILL: it connects with the
//! settings in the environment (see `edupulse_fault_suite::child`), runs
//! `start_relay()`, prints `ready`, then a `status leader=… published=…` line whenever
//! that changes, until it is killed, told `stop`, or its stdin ends.

use edupulse_fault_suite::child::{
    config_from_env, connect_until_up, relay_settings_from_env, say, stdin_commands,
};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut commands = stdin_commands();
    let config = match config_from_env(relay_settings_from_env()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("relay-child: {error}");
            std::process::exit(2);
        }
    };
    let service = connect_until_up(config).await;
    let relay = service.start_relay().await.expect("the relay starts");
    say("ready");
    let mut last = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            command = commands.recv() => match command.as_deref() {
                Some("stop") | None => break,
                Some(_) => {}
            },
            _ = ticker.tick() => {
                let now = (relay.is_leader(), relay.published());
                if last != Some(now) {
                    say(&format!("status leader={} published={}", now.0, now.1));
                    last = Some(now);
                }
            }
        }
    }
    if let Err(error) = relay.shutdown().await {
        eprintln!("relay-child: {error}");
        std::process::exit(1);
    }
    say("stopped");
}
