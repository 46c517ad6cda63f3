//! Credentials never reach a log line, an error or a `Debug` string, whatever form the
//! URL takes; credentials written in a NATS URL still authenticate.

use edupulse_events::{Config, ConnectErrorKind, EventService};
use edupulse_events_tests::{NatsServer, TestEnv};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Everything logged at any level, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut all) = self.0.lock() {
            all.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|all| all.clone()).unwrap_or_default())
            .into_owned()
    }
}

// A current-thread runtime: every task (async-nats' connection task too) logs through
// the subscriber set for this thread.
#[tokio::test(flavor = "current_thread")]
async fn nats_credentials_in_any_url_form_authenticate_and_are_never_shown() {
    const SECRET: &str = "nats-s3cret-pw";
    let server = NatsServer::start_with(&["--user", "me", "--pass", SECRET]).await;
    let env = TestEnv::with_nats(server.url()).await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    for url in [
        format!("nats://me:{SECRET}@127.0.0.1:{}", server.port),
        // No scheme, as async-nats accepts it.
        format!("me:{SECRET}@127.0.0.1:{}", server.port),
    ] {
        let config = env.config().nats_url(&url).build().expect("config");
        let shown = format!("{config:?} {}", config.nats_url_redacted());
        assert!(!shown.contains(SECRET), "{shown}");
        let service = EventService::connect(config)
            .await
            .expect("credentials in the URL authenticate");
        assert!(!format!("{service:?}").contains(SECRET));
        drop(service);

        // A wrong password: the error names the server, not the secret.
        let wrong = url.replace(SECRET, "wrong-pw-123");
        let config = env.config().nats_url(&wrong).build().expect("config");
        let error = EventService::connect(config).await.expect_err("refused");
        assert_eq!(error.kind(), ConnectErrorKind::Nats, "{error}");
        let message = format!("{error} {error:?}");
        assert!(!message.contains("wrong-pw-123"), "{message}");
    }
    let logged = captured.text();
    assert!(
        logged.contains("127.0.0.1"),
        "the client logged its connection: {logged}"
    );
    assert!(
        !logged.contains(SECRET),
        "a log line holds the password:\n{logged}"
    );
}

#[test]
fn database_passwords_with_reserved_characters_are_never_echoed() {
    for password in [
        "pa/ss-123",
        "pa?ss-123",
        "pa#ss-123",
        "p@ss-123",
        "pa,ss-123",
    ] {
        let url = format!("postgres://app:{password}@127.0.0.1:5432/app");
        let shown = match Config::builder(&url).build() {
            Ok(config) => format!("{config:?} {}", config.database_url_redacted()),
            Err(error) => format!("{error} {error:?}"),
        };
        assert!(!shown.contains(password), "{password}: {shown}");
        assert!(shown.contains("127.0.0.1"), "{password}: {shown}");
    }
}
