//! `examples/web_install` end to end in a real headless Chromium, driven over WebDriver
//! (chromedriver): click Install, approve at the mock provider's consent page, land back on
//! the installed page; then an attacker's browser replays the victim's callback URL and is
//! refused. A screenshot of each page goes to `target/web_install/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them). Without
//! them the test says so loudly and passes only if `TOKENKEEPER_REQUIRE_BROWSER` is unset.

#[allow(dead_code)]
#[path = "../web_install.rs"]
mod web_install;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9515)
}

/// chromedriver, stopped on drop.
struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session (its own profile directory: its own cookies).
struct Session<'a> {
    driver: &'a Driver,
    id: String,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Driver {
    async fn start(chromedriver: &Path) -> Fallible<Self> {
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let driver = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        for _ in 0..100 {
            if driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await
                .is_ok()
            {
                return Ok(driver);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("chromedriver did not start".into())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Fallible<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let reply: Value = req.send().await?.json().await?;
        if let Some(error) = reply["value"].get("error") {
            return Err(format!("webdriver {path}: {error}: {}", reply["value"]["message"]).into());
        }
        Ok(reply["value"].clone())
    }

    async fn session(&self, chromium: &Path, tag: &str) -> Fallible<Session<'_>> {
        let profile =
            std::env::temp_dir().join(format!("tk-chromium-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1100,700",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let value = self
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await?;
        let id = value["sessionId"]
            .as_str()
            .ok_or("no session id")?
            .to_owned();
        Ok(Session {
            driver: self,
            id,
            _profile: tempdir::Dir(profile),
        })
    }
}

impl Session<'_> {
    async fn post(&self, path: &str, body: Value) -> Fallible<Value> {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}{path}", self.id),
                Some(body),
            )
            .await
    }
    async fn get(&self, path: &str) -> Fallible<Value> {
        self.driver
            .call(
                reqwest::Method::GET,
                &format!("/session/{}{path}", self.id),
                None,
            )
            .await
    }
    async fn open(&self, url: &str) -> Fallible<()> {
        self.post("/url", json!({"url": url})).await.map(drop)
    }
    async fn click(&self, css: &str) -> Fallible<()> {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await?;
        let element = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or("no element id")?
            .to_owned();
        self.post(&format!("/element/{element}/click"), json!({}))
            .await
            .map(drop)
    }
    /// Clicks `css` and waits (up to 10 s) until the navigation it starts has left the page
    /// and the new document is loaded: a click's reply can come before a form's POST and its
    /// redirects have landed, and reading the page then reads the old one.
    async fn click_and_wait(&self, css: &str) -> Fallible<()> {
        let before = self.url().await?;
        self.click(css).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ready = self
                .post(
                    "/execute/sync",
                    json!({"script": "return document.readyState", "args": []}),
                )
                .await?;
            if self.url().await? != before && ready.as_str() == Some("complete") {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("clicking {css} did not leave {before}").into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    async fn text(&self) -> Fallible<String> {
        let v = self
            .post(
                "/execute/sync",
                json!({"script": "return document.body.innerText", "args": []}),
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }
    async fn url(&self) -> Fallible<String> {
        Ok(self
            .get("/url")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
    async fn screenshot(&self, name: &str) -> Fallible<PathBuf> {
        let png = self.get("/screenshot").await?;
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(png.as_str().ok_or("no png")?)?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web_install");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes)?;
        Ok(path)
    }
    async fn close(self) {
        let _ = self
            .driver
            .call(
                reqwest::Method::DELETE,
                &format!("/session/{}", self.id),
                None,
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_in_chromium_then_an_attacker_replays_the_callback() -> Fallible<()> {
    let (Some(chromium), Some(chromedriver)) = (
        find("TOKENKEEPER_CHROMIUM", &["chromium", "chromium-browser"]),
        find("TOKENKEEPER_CHROMEDRIVER", &["chromedriver"]),
    ) else {
        let message = "\n!!!!!!!!\n!!! SKIPPED: the web_install browser test needs chromium and chromedriver \
             (Debian packages chromium and chromium-driver; scripts/test.sh installs them)\n!!!!!!!!\n";
        eprintln!("{message}");
        if std::env::var_os("TOKENKEEPER_REQUIRE_BROWSER").is_some() {
            return Err(message.into());
        }
        return Ok(());
    };
    let app = web_install::start().await?;
    let driver = Driver::start(&chromedriver).await?;

    // The victim: home page, Install, the provider's consent page, Approve, back installed.
    let victim = driver.session(&chromium, "victim").await?;
    victim.open(&format!("{}/", app.base)).await?;
    victim.screenshot("1-home").await?;
    victim.click_and_wait("#install").await?;
    let consent = victim.text().await?;
    assert!(
        consent.contains("Authorize tokenkeeper-test-key"),
        "{consent}"
    );
    victim.screenshot("2-consent").await?;
    victim.click_and_wait("#approve").await?;
    let landed = victim.text().await?;
    let callback_url = victim.url().await?;
    victim.screenshot("3-installed").await?;
    assert!(landed.contains("Installed"), "{landed}");
    assert!(landed.contains("is active"), "{landed}");
    assert!(landed.contains("Provider account: {mock-user}"), "{landed}");
    assert!(callback_url.contains("/callback?code="), "{callback_url}");
    let page = app
        .manager
        .store()
        .list(tokenkeeper::core::ListFilter::all(), None, 10)
        .await?;
    assert_eq!(page.entries.len(), 1, "one installation");
    let id = page.entries[0].id.clone();
    assert!(
        landed.contains(id.as_str()),
        "the page names {id}: {landed}"
    );
    let installed = app.manager.store().get(&id).await?.ok_or("installed")?;
    victim.close().await;

    // The attacker's browser begins a flow of its own (so it holds a flow cookie), then opens
    // the victim's callback URL from history, logs or a Referer.
    let attacker = driver.session(&chromium, "attacker").await?;
    attacker.open(&format!("{}/", app.base)).await?;
    attacker.click_and_wait("#install").await?;
    attacker.open(&callback_url).await?;
    let refused = attacker.text().await?;
    attacker.screenshot("4-attacker-refused").await?;
    assert!(refused.contains("Installation refused"), "{refused}");
    // Its own flow's cookie is not the victim's flow's: it holds none for this state.
    assert!(
        refused.contains("holds no cookie of this authorization"),
        "{refused}"
    );
    attacker.close().await;

    // Nothing changed: one exchange in all, the victim's installation untouched.
    assert_eq!(app.mock.counters().totals.code_exchanges, 1);
    assert_eq!(app.manager.store().get(&id).await?, Some(installed));
    Ok(())
}
