//! A consumer group instance in a process of its own, for the suite to SIGKILL. It
//! records every `Tick`'s effect in `fault_effects` with `on_tx` (group
//! `EDUPULSE_FAULT_GROUP`, instance label `EDUPULSE_FAULT_INSTANCE`), prints `ready`
//! and, every 200 ms, `stats handled=… duplicates=…`.
//!
//! With `EDUPULSE_FAULT_DOOM_AFTER=n`, the n-th event it handles is "doomed": inside
//! the handler it prints `doomed {event id} {stream sequence}` and waits for `go` on
//! stdin before returning, so that the parent can hold the ack (by stalling the NATS
//! connection at its proxy), let the transaction commit, and SIGKILL the process
//! between the commit and the ack.

use edupulse_fault_suite::child::{
    config_from_env, connect_until_up, consumer_settings_from_env, say, stdin_commands,
};
use edupulse_fault_suite::workload::{record_effect, suite_relay};
use edupulse_fault_suite::Tick;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut commands = stdin_commands();
    let group = std::env::var("EDUPULSE_FAULT_GROUP").unwrap_or_else(|_| "effects".into());
    let instance: Arc<str> = Arc::from(
        std::env::var("EDUPULSE_FAULT_INSTANCE").unwrap_or_else(|_| "consumer-child".into()),
    );
    let doom_after: Option<u64> = std::env::var("EDUPULSE_FAULT_DOOM_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = match config_from_env(suite_relay()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("consumer-child: {error}");
            std::process::exit(2);
        }
    };
    let service = connect_until_up(config).await;
    let handled = Arc::new(AtomicU64::new(0));
    let go = Arc::new(Notify::new());
    let consumer = {
        let handled = handled.clone();
        let go = go.clone();
        service
            .consumer(group.as_str())
            .settings(consumer_settings_from_env())
            .on_tx::<Tick, _>(move |tx, received| {
                let handled = handled.clone();
                let go = go.clone();
                let instance = instance.clone();
                Box::pin(async move {
                    let (id, sequence) = (received.envelope.id, received.envelope.stream_sequence);
                    record_effect(tx, received, instance).await?;
                    let nth = handled.fetch_add(1, Ordering::SeqCst) + 1;
                    if doom_after == Some(nth) {
                        say(&format!("doomed {id} {sequence}"));
                        go.notified().await;
                    }
                    Ok(())
                })
            })
            .start()
            .await
    };
    let consumer = match consumer {
        Ok(consumer) => consumer,
        Err(error) => {
            eprintln!("consumer-child: {error}");
            std::process::exit(3);
        }
    };
    say("ready");
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            command = commands.recv() => match command.as_deref() {
                Some("go") => go.notify_one(),
                Some("stop") | None => break,
                Some(_) => {}
            },
            _ = ticker.tick() => say(&format!(
                "stats handled={} duplicates={}",
                consumer.handled(),
                consumer.duplicates()
            )),
        }
    }
    let (handled, duplicates) = (consumer.handled(), consumer.duplicates());
    if let Err(error) = consumer.shutdown().await {
        eprintln!("consumer-child: {error}");
        std::process::exit(1);
    }
    say(&format!(
        "stopped handled={handled} duplicates={duplicates}"
    ));
}
