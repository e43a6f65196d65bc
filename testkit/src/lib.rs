//! Test support shared by the chatfleet crates: real servers (`nats-server` with JetStream,
//! SecantusDB for MongoDB, and RabbitMQ) started per test on free ports, and small helpers.
//!
//! Every server is a child process that is killed when its handle is dropped, including while
//! a failing test unwinds. Each test owns its servers, so tests never share state; under
//! nextest every test is also its own process.
//!
//! RabbitMQ is the exception to one server per test: a node takes seconds to boot, so most
//! tests get a [`RabbitVhost`], a virtual host of their own on the machine's shared broker
//! (started by `scripts/test.sh`) that is deleted on drop. Only tests that kill or restart the
//! broker start a private [`RabbitMqServer`].

pub mod deploy;
mod mongo;
mod nats;
mod process;
mod rabbitmq;
mod tls;

use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::sync::Mutex;

pub use mongo::{MongoServer, mongo_server_binary};
pub use nats::{ClusterNode, NatsCluster, NatsServer, nats_server_binary};
pub use rabbitmq::{RabbitMqCluster, RabbitMqServer, RabbitVhost, rabbitmq_server_binary};
pub use tls::TestPki;

/// Where [`free_port`] picks from: below Linux's ephemeral range (32768 and up by default),
/// so that no outgoing connection and no listener bound to port 0 takes a port between the
/// moment it is handed out and the moment its server binds it.
const TEST_PORTS: Range<u16> = 20_000..32_000;

/// The lock files of the ports this process has handed out, held until it exits.
static RESERVED: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// A TCP port on 127.0.0.1 for a server a test is about to start, reserved for this process
/// until it exits.
///
/// Test processes run side by side and their servers take a while to bind (SecantusDB is a
/// Python program), so a port that is merely free now could be handed to two of them. Each
/// port therefore comes with an exclusive lock on a file named after it in the temporary
/// directory, which every test process honours and the kernel releases when the process
/// ends, however it ends; a port that something outside the tests holds is skipped.
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("chatfleet-test-ports");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = RandomState::new().hash_one(std::process::id()) % span;
    for step in 0..span {
        let port = TEST_PORTS.start + ((start + step) % span) as u16;
        let path = dir.join(port.to_string());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open the port lock {}: {e}", path.display()));
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => panic!("cannot lock {}: {e}", path.display()),
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue;
        }
        RESERVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(file);
        return port;
    }
    panic!("no free port in {TEST_PORTS:?} on 127.0.0.1");
}
