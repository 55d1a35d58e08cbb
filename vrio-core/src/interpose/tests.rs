use super::*;

#[test]
fn a_policy_round_trips_through_json_and_builds() {
    let json = r#"{"stages":[
        {"stage":"meter"},
        {"stage":"qos","rw_ios_per_sec":100},
        {"stage":"fault","first_sector":0,"sectors":8,"error":"ioerr"},
        {"stage":"crypt","key":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"}
    ]}"#;
    let spec = PolicySpec::parse(json).expect("parses");
    assert_eq!(spec.summary(), "meter,qos,fault,crypt");
    assert_eq!(PolicySpec::parse(&spec.to_json()).expect("again"), spec);
    let p = spec.build(7).expect("builds");
    assert_eq!(p.reports().len(), 4);
    // Shown policies never carry the key.
    let shown = serde_json::to_string(&spec.redacted()).expect("json");
    assert!(!shown.contains("0001020304"), "{shown}");
    assert!(shown.contains(REDACTED));
    assert!(!format!("{spec:?}").contains("0001020304"));
}

#[test]
fn unknown_stages_and_fields_are_refused_clearly() {
    let e = PolicySpec::parse(r#"{"stages":[{"stage":"compress"}]}"#).expect_err("unknown");
    assert!(e.to_string().contains("compress"), "{e}");
    let e = PolicySpec::parse(r#"{"stages":[{"stage":"qos","iops":5}]}"#).expect_err("field");
    assert!(e.to_string().contains("iops"), "{e}");
    let e = PolicySpec::parse(r#"{"stages":[{"stage":"qos"}]}"#)
        .expect("parses")
        .build(1)
        .expect_err("no limit");
    assert!(e.to_string().contains("stage 0 (qos)"), "{e}");
}

#[test]
fn a_failed_set_keeps_the_old_policy() {
    let p = Policies::new();
    let good = PolicySpec::parse(r#"{"stages":[{"stage":"meter"}]}"#).expect("parses");
    p.set(4, &good).expect("applies");
    let mut q = Interposed::new(p.interposer(4));
    assert!(!q.current().is_empty());
    let bad = PolicySpec::parse(r#"{"stages":[{"stage":"crypt","key":"00"}]}"#).expect("parses");
    assert!(p.set(4, &bad).is_err());
    assert_eq!(p.spec(4), good);
    assert_eq!(q.current().spec(), &good);
    // A good change reaches the queue at its next look.
    p.set(4, &PolicySpec::default()).expect("clears");
    assert!(q.current().is_empty());
}

#[test]
fn admission_resumes_where_it_stopped() {
    use std::time::{Duration, Instant};
    // One request per second, then a delay: the QoS stage must charge the
    // request once even though the fault stage holds it back.
    let spec = PolicySpec::parse(
        r#"{"stages":[{"stage":"qos","rw_ios_per_sec":1,"burst_ms":1000},
                      {"stage":"fault","first_sector":0,"sectors":1,"delay_ms":10}]}"#,
    )
    .expect("parses");
    let p = spec.build(1).expect("builds");
    let t = Instant::now();
    let r = Request {
        device: 1,
        op: Op::Read,
        sector: 0,
        len: 512,
        frame: None,
        arrived: t,
        vm_host: 0,
    };
    let mut passed = 0;
    assert_eq!(
        p.admit(&r, t, &mut passed),
        Admit::Wait(t + Duration::from_millis(10))
    );
    assert_eq!(passed, 1);
    assert_eq!(
        p.admit(&r, t + Duration::from_millis(10), &mut passed),
        Admit::Go
    );
    // The bucket held one token and was charged once, so it is not in
    // debt: one more request runs (charged twice, it would wait), and the
    // one after waits.
    let r2 = Request { sector: 100, ..r };
    let later = t + Duration::from_millis(10);
    assert_eq!(p.admit(&r2, later, &mut 0), Admit::Go);
    assert!(matches!(p.admit(&r2, later, &mut 0), Admit::Wait(_)));
}
