//! The Kubernetes manifests of `deploy/`, offline: each overlay renders with `kubectl
//! kustomize`, every object validates strictly (Kubernetes schemas; KEDA's CRD schemas for the
//! ScaledObjects and TriggerAuthentications), and the objects say what the fleet needs: KEDA
//! reads exactly the stream, consumers and queues chatfleet creates, workers get longer to stop
//! than their drain, every reference resolves. `keda_lag.rs` checks the same triggers against
//! running brokers.

use std::collections::BTreeSet;

use schemas::subjects::{AmqpNames, Names};
use schemas::{Partition, PartitionCount};
use serde_json::Value;
use testkit::deploy::{object, render, render_yaml, validate};

const OVERLAYS: [&str; 2] = ["nats", "rabbitmq"];

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("a string, not {v}"))
}

/// The partition count every role of the overlay is configured with.
fn partitions(objects: &[Value]) -> PartitionCount {
    let config = object(objects, "ConfigMap", "chatfleet-config");
    PartitionCount::new(s(&config["data"]["CHATFLEET_PARTITIONS"]).parse().unwrap()).unwrap()
}

fn container<'a>(objects: &'a [Value], deployment: &str) -> &'a Value {
    let containers =
        object(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{deployment} runs one container");
    &containers[0]
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name).map(|e| s(&e["value"]))
}

fn scaled_object(objects: &[Value]) -> &Value {
    object(objects, "ScaledObject", "chatfleet-worker")
}

#[test]
fn every_overlay_renders_and_every_object_validates_strictly() {
    for overlay in OVERLAYS {
        let objects = render(overlay);

        for (kind, name) in [
            ("Deployment", "chatfleet-gateway"),
            ("Deployment", "chatfleet-worker"),
            ("Service", "chatfleet-gateway"),
            ("PodDisruptionBudget", "chatfleet-gateway"),
            ("PodDisruptionBudget", "chatfleet-worker"),
            ("ConfigMap", "chatfleet-config"),
            ("Secret", "chatfleet-secrets"),
            ("Secret", "chatfleet-channels"),
            ("ScaledObject", "chatfleet-worker"),
        ] {
            object(&objects, kind, name);
        }
        assert_eq!(objects.iter().filter(|o| o["kind"] == "TriggerAuthentication").count(), 1, "{overlay}");
    }
}

#[test]
fn the_validator_refuses_an_unknown_field_and_a_keda_trigger_value_that_is_not_a_string() {
    let yaml = render_yaml("rabbitmq");

    let misspelt = validate(&yaml.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystm: true"));
    let unquoted = validate(&yaml.replace("useRegex: \"true\"", "useRegex: true"));
    let unknown_keda_field = validate(&yaml.replace("maxReplicaCount:", "maxReplicas:"));

    assert!(misspelt.as_ref().is_err_and(|e| e.contains("readOnlyRootFilesystm")), "{misspelt:?}");
    assert!(unquoted.as_ref().is_err_and(|e| e.contains("useRegex")), "{unquoted:?}");
    assert!(unknown_keda_field.as_ref().is_err_and(|e| e.contains("maxReplicas")), "{unknown_keda_field:?}");
}

#[test]
fn the_nats_triggers_name_the_input_stream_and_every_partition_consumer_and_add_them_up() {
    let objects = render("nats");
    let partitions = partitions(&objects);
    let names = Names::default();
    let so = scaled_object(&objects);

    let triggers = so["spec"]["triggers"].as_array().unwrap();
    let consumers: Vec<&str> = triggers.iter().map(|t| s(&t["metadata"]["consumer"])).collect();
    let expected: Vec<String> = partitions.all().map(|p| names.partition_consumer(p)).collect();
    let formula = s(&so["spec"]["advanced"]["scalingModifiers"]["formula"]);
    let terms: BTreeSet<&str> = formula.split('+').map(str::trim).collect();
    let trigger_names: BTreeSet<&str> = triggers.iter().map(|t| s(&t["name"])).collect();

    assert_eq!(consumers, expected, "one trigger per partition consumer, in order");
    for trigger in triggers {
        assert_eq!(trigger["type"], "nats-jetstream");
        assert_eq!(s(&trigger["metadata"]["stream"]), names.input_stream());
        assert_eq!(trigger["metadata"]["account"], "$G", "the account of a server without accounts");
        let auth = s(&trigger["authenticationRef"]["name"]);
        let ta = object(&objects, "TriggerAuthentication", auth);
        assert_eq!(ta["spec"]["secretTargetRef"][0]["parameter"], "natsServerMonitoringEndpoint");
    }
    assert_eq!(terms, trigger_names, "the formula adds every trigger once");
    assert_eq!(terms.len(), triggers.len());
    assert_eq!(so["spec"]["advanced"]["scalingModifiers"]["metricType"], "AverageValue");
}

#[test]
fn the_rabbitmq_trigger_adds_up_the_partition_queues_through_the_management_api() {
    let objects = render("rabbitmq");
    let names = AmqpNames::default();
    let so = scaled_object(&objects);

    let triggers = so["spec"]["triggers"].as_array().unwrap();
    let meta = &triggers[0]["metadata"];
    let queue = names.partition_queue(Partition::new(0));
    let prefix = queue.strip_suffix(".0").unwrap().replace('.', "\\.");

    assert_eq!(triggers.len(), 1);
    assert_eq!(triggers[0]["type"], "rabbitmq");
    assert_eq!(meta["protocol"], "http", "regex and sum need the management API");
    assert_eq!(meta["mode"], "QueueLength");
    assert_eq!(meta["useRegex"], "true");
    assert_eq!(meta["operation"], "sum");
    assert_eq!(s(&meta["queueName"]), format!("^{prefix}\\.[0-9]+$"));
    let auth = object(&objects, "TriggerAuthentication", s(&triggers[0]["authenticationRef"]["name"]));
    assert_eq!(auth["spec"]["secretTargetRef"][0]["parameter"], "host");
}

#[test]
fn workers_never_outnumber_partitions_and_scale_down_one_at_a_time() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let so = scaled_object(&objects);
        let spec = &so["spec"];
        let down = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"];

        assert!(spec["maxReplicaCount"].as_u64().unwrap() <= u64::from(partitions(&objects).get()), "{overlay}");
        assert!(spec["minReplicaCount"].as_u64().unwrap() >= 1, "{overlay}: scaling to zero is the operator's choice");
        assert_eq!(s(&spec["scaleTargetRef"]["name"]), "chatfleet-worker");
        assert!(down["stabilizationWindowSeconds"].as_u64().unwrap() >= 60, "{overlay}");
        for policy in down["policies"].as_array().unwrap() {
            assert_eq!((&policy["type"], policy["value"].as_u64()), (&Value::from("Pods"), Some(1)), "{overlay}");
        }
    }
}

#[test]
fn workers_get_longer_to_stop_than_their_drain_and_gateways_pause_before_stopping() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let worker = object(&objects, "Deployment", "chatfleet-worker");
        let gateway = object(&objects, "Deployment", "chatfleet-gateway");
        let worker_grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
        let gateway_grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
        let drain: u64 =
            env(container(&objects, "chatfleet-worker"), "CHATFLEET_SHUTDOWN_GRACE").unwrap().parse().unwrap();
        let pause =
            container(&objects, "chatfleet-gateway")["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap();

        // The worker exits within about a second of its grace (ARCHITECTURE.md); leave margin.
        assert!(worker_grace >= drain + 5, "{overlay}: {worker_grace} s to stop, {drain} s of drain");
        assert!(gateway_grace >= pause + 5, "{overlay}: {gateway_grace} s to stop, {pause} s of pause");
        assert!(worker["spec"].get("replicas").is_none(), "{overlay}: KEDA owns the worker count");
    }
}

#[test]
fn every_container_runs_unprivileged_on_a_read_only_root_with_probes_and_metrics_on_its_listen_port() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        for (deployment, role) in [("chatfleet-gateway", "gateway"), ("chatfleet-worker", "worker")] {
            let pod = &object(&objects, "Deployment", deployment)["spec"]["template"];
            let c = container(&objects, deployment);
            let port: u64 = env(c, "CHATFLEET_LISTEN").unwrap().rsplit(':').next().unwrap().parse().unwrap();
            let port_name = s(&c["ports"][0]["name"]);

            assert_eq!(c["args"], serde_json::json!([role]), "{overlay}: one image, the role as its argument");
            assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true, "{overlay} {deployment}");
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{overlay} {deployment}");
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{overlay} {deployment}");
            assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(port), "{overlay} {deployment}");
            assert_eq!(
                (s(&c["livenessProbe"]["httpGet"]["path"]), s(&c["livenessProbe"]["httpGet"]["port"])),
                ("/healthz", port_name)
            );
            assert_eq!(
                (s(&c["readinessProbe"]["httpGet"]["path"]), s(&c["readinessProbe"]["httpGet"]["port"])),
                ("/readyz", port_name)
            );
            assert_eq!(
                pod["metadata"]["annotations"]["prometheus.io/port"],
                port.to_string(),
                "{overlay} {deployment}"
            );
            assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());
        }
    }
}

#[test]
fn every_config_map_and_secret_an_object_names_is_rendered_with_it() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let present: BTreeSet<(&str, &str)> =
            objects.iter().map(|o| (s(&o["kind"]), s(&o["metadata"]["name"]))).collect();
        let mut references = Vec::new();
        for deployment in ["chatfleet-gateway", "chatfleet-worker"] {
            let pod = &object(&objects, "Deployment", deployment)["spec"]["template"]["spec"];
            for from in pod["containers"][0]["envFrom"].as_array().unwrap() {
                if let Some(name) = from["configMapRef"]["name"].as_str() {
                    references.push(("ConfigMap", name));
                }
                if let Some(name) = from["secretRef"]["name"].as_str() {
                    references.push(("Secret", name));
                }
            }
            for volume in pod["volumes"].as_array().into_iter().flatten() {
                references.push(("Secret", s(&volume["secret"]["secretName"])));
            }
        }
        for ta in objects.iter().filter(|o| o["kind"] == "TriggerAuthentication") {
            for target in ta["spec"]["secretTargetRef"].as_array().unwrap() {
                references.push(("Secret", s(&target["name"])));
            }
        }
        for trigger in scaled_object(&objects)["spec"]["triggers"].as_array().unwrap() {
            references.push(("TriggerAuthentication", s(&trigger["authenticationRef"]["name"])));
        }
        references.push(("Deployment", s(&scaled_object(&objects)["spec"]["scaleTargetRef"]["name"])));

        assert!(references.len() > 5, "{overlay}");
        for reference in references {
            assert!(present.contains(&reference), "{overlay}: {reference:?} is named but not rendered");
        }
    }
}
