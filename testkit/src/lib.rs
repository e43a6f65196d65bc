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

mod mongo;
mod nats;
mod process;
mod rabbitmq;

use std::net::{Ipv4Addr, TcpListener};

pub use mongo::{MongoServer, mongo_server_binary};
pub use nats::{NatsServer, nats_server_binary};
pub use rabbitmq::{RabbitMqServer, RabbitVhost, rabbitmq_server_binary};

/// A TCP port on 127.0.0.1 that was free a moment ago: bound to port 0, read, and released.
///
/// Another process could take it before the caller binds it; the servers here fail loudly
/// (with their log) if that happens, which is rare enough for tests.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("cannot read the address of a bound socket: {e}")).port()
}
