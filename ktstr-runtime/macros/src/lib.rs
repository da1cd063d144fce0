//! `#[ktstr_test(...)]`: registers a scheduler test in ktstr's link-time
//! registry and emits a plain `#[test]` wrapper for `cargo test`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprArray, ExprLit, ItemFn, Lit, Meta, Token};

#[proc_macro_attribute]
pub fn ktstr_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

const KEYS: &str = "cpus, numa_nodes, llcs, cores, threads, memory_mib, timeout_s, host_only, expect_err, cmdline, include_files, host_tools, scheduler, scheduler_args, expect_scx_error, gauntlet, min_cpus, max_cpus, min_llcs, min_numa_nodes, requires_smt, max_gap_ms, max_wake_p99_us, max_spread_pct, max_migrations_per_s, not_starved, isolated, cold_boot";
/// Largest VM, a test's own or a gauntlet preset
/// (`ktstr_runtime::vmm::topology::MAX_CPUS`: x2APIC, `CONFIG_NR_CPUS`).
const MAX_CPUS: u64 = 256;

/// Parsed attribute values; `None` means "runtime default".
#[derive(Debug, Default, PartialEq)]
struct Attrs {
    cpus: Option<u32>,
    numa_nodes: Option<u32>,
    llcs: Option<u32>,
    cores: Option<u32>,
    threads: Option<u32>,
    memory_mib: Option<u64>,
    timeout_s: Option<u64>,
    host_only: bool,
    expect_err: bool,
    cmdline: Option<String>,
    include_files: Vec<String>,
    /// Host programs to pack into the guest (bare names or absolute paths).
    host_tools: Vec<String>,
    /// sched_ext: the path of a `const Scheduler`, as tokens text.
    scheduler: Option<String>,
    /// Checks `ctx.run` applies to every report.
    max_gap_ms: Option<u64>,
    max_wake_p99_us: Option<u64>,
    max_spread_pct: Option<f64>,
    max_migrations_per_s: Option<f64>,
    not_starved: bool,
    isolated: bool,
    /// Never start from a VM snapshot.
    cold_boot: bool,
    scheduler_args: Vec<String>,
    expect_scx_error: Option<String>,
    /// `gauntlet = false`: no topology variants.
    gauntlet: Option<bool>,
    min_cpus: Option<u32>,
    max_cpus: Option<u32>,
    min_llcs: Option<u32>,
    min_numa_nodes: Option<u32>,
    requires_smt: bool,
}

fn int<T: std::str::FromStr>(e: &Expr, key: &str, min: u64, max: u64) -> syn::Result<T> {
    if let Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) = e {
        let v: u64 = i.base10_parse()?;
        if v < min || v > max {
            return Err(syn::Error::new_spanned(e, format!("`{key}` must be between {min} and {max}, got {v}")));
        }
        return v
            .to_string()
            .parse()
            .map_err(|_| syn::Error::new_spanned(e, format!("`{key}` value out of range")));
    }
    Err(syn::Error::new_spanned(e, format!("`{key}` takes an integer literal, e.g. `{key} = 2`")))
}

/// An integer or float literal ≥ `min`.
fn number(e: &Expr, key: &str, min: f64) -> syn::Result<f64> {
    let v = match e {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<u64>()? as f64,
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => f.base10_parse::<f64>()?,
        _ => return Err(syn::Error::new_spanned(e, format!("`{key}` takes a number, e.g. `{key} = 10` or `{key} = 2.5`"))),
    };
    if !v.is_finite() || v < min {
        return Err(syn::Error::new_spanned(e, format!("`{key}` must be at least {min}, got {v}")));
    }
    Ok(v)
}

fn boolean(e: &Expr, key: &str) -> syn::Result<bool> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => Ok(b.value),
        _ => Err(syn::Error::new_spanned(e, format!("`{key}` takes `true` or `false` (or write just `{key}`)"))),
    }
}

fn string(e: &Expr, key: &str) -> syn::Result<String> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.value()),
        _ => Err(syn::Error::new_spanned(e, format!("`{key}` takes a string literal"))),
    }
}

fn parse_attrs(attr: TokenStream2) -> syn::Result<Attrs> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut a = Attrs::default();
    let mut seen: Vec<String> = Vec::new();
    let mut topo_span: Option<Span> = None;
    let mut cpus_span: Option<Span> = None;
    for meta in &metas {
        let key = meta.path().get_ident().map(|i| i.to_string()).unwrap_or_default();
        if seen.contains(&key) {
            return Err(syn::Error::new_spanned(meta, format!("`{key}` given twice")));
        }
        seen.push(key.clone());
        match meta {
            Meta::Path(_) => match key.as_str() {
                "host_only" => a.host_only = true,
                "expect_err" => a.expect_err = true,
                "not_starved" => a.not_starved = true,
                "isolated" => a.isolated = true,
                "cold_boot" => a.cold_boot = true,
                "requires_smt" => a.requires_smt = true,
                _ => {
                    return Err(syn::Error::new_spanned(
                        meta,
                        format!("`{key}` needs a value (`{key} = ...`); accepted keys: {KEYS}"),
                    ))
                }
            },
            Meta::NameValue(nv) => {
                let v = &nv.value;
                match key.as_str() {
                    "cpus" => {
                        a.cpus = Some(int(v, &key, 1, MAX_CPUS)?);
                        cpus_span = Some(meta.span());
                    }
                    "numa_nodes" | "llcs" | "cores" | "threads" => {
                        let n = Some(int(v, &key, 1, MAX_CPUS)?);
                        match key.as_str() {
                            "numa_nodes" => a.numa_nodes = n,
                            "llcs" => a.llcs = n,
                            "cores" => a.cores = n,
                            _ => a.threads = n,
                        }
                        topo_span.get_or_insert(meta.span());
                    }
                    "memory_mib" => a.memory_mib = Some(int(v, &key, 64, 1 << 20)?),
                    "timeout_s" => a.timeout_s = Some(int(v, &key, 1, 24 * 3600)?),
                    "host_only" => a.host_only = boolean(v, &key)?,
                    "requires_smt" => a.requires_smt = boolean(v, &key)?,
                    "gauntlet" => a.gauntlet = Some(boolean(v, &key)?),
                    "min_cpus" => a.min_cpus = Some(int(v, &key, 1, MAX_CPUS)?),
                    "max_cpus" => a.max_cpus = Some(int(v, &key, 1, MAX_CPUS)?),
                    "min_llcs" => a.min_llcs = Some(int(v, &key, 1, MAX_CPUS)?),
                    "min_numa_nodes" => a.min_numa_nodes = Some(int(v, &key, 1, MAX_CPUS)?),
                    "expect_err" => a.expect_err = boolean(v, &key)?,
                    "not_starved" => a.not_starved = boolean(v, &key)?,
                    "isolated" => a.isolated = boolean(v, &key)?,
                    "cold_boot" => a.cold_boot = boolean(v, &key)?,
                    "max_gap_ms" => a.max_gap_ms = Some(int(v, &key, 1, 3_600_000)?),
                    "max_wake_p99_us" => a.max_wake_p99_us = Some(int(v, &key, 1, 3_600_000_000)?),
                    "max_spread_pct" => a.max_spread_pct = Some(number(v, &key, 0.0)?),
                    "max_migrations_per_s" => a.max_migrations_per_s = Some(number(v, &key, 0.0)?),
                    "cmdline" => {
                        let s = string(v, &key)?;
                        if s.contains(['\n', '\0']) {
                            return Err(syn::Error::new_spanned(v, "`cmdline` must be one line"));
                        }
                        if s.split_whitespace().any(|w| w.starts_with("ktstr.")) {
                            return Err(syn::Error::new_spanned(v, "`cmdline` must not set ktstr.* arguments; ktstr owns them"));
                        }
                        a.cmdline = Some(s);
                    }
                    "include_files" => {
                        let Expr::Array(ExprArray { elems, .. }) = v else {
                            return Err(syn::Error::new_spanned(v, "`include_files` takes an array of string literals, e.g. `[\"data/x.bin\"]`"));
                        };
                        for e in elems {
                            a.include_files.push(string(e, "include_files")?);
                        }
                    }
                    "host_tools" => {
                        let Expr::Array(ExprArray { elems, .. }) = v else {
                            return Err(syn::Error::new_spanned(v, "`host_tools` takes an array of program names or absolute paths, e.g. `[\"bpftool\"]`"));
                        };
                        for e in elems {
                            let t = string(e, "host_tools")?;
                            let base = t.rsplit('/').next().unwrap_or("");
                            if base.is_empty() || t.contains(char::is_whitespace) || (t.contains('/') && !t.starts_with('/')) {
                                return Err(syn::Error::new_spanned(e, "`host_tools` entries are program names (`bpftool`) or absolute paths (`/usr/sbin/bpftool`)"));
                            }
                            if a.host_tools.iter().any(|o| o.rsplit('/').next() == Some(base)) {
                                return Err(syn::Error::new_spanned(e, format!("`host_tools`: two tools named `{base}` (both would be /ktstr/bin/{base})")));
                            }
                            a.host_tools.push(t);
                        }
                    }
                    "scheduler_args" => {
                        let Expr::Array(ExprArray { elems, .. }) = v else {
                            return Err(syn::Error::new_spanned(v, "`scheduler_args` takes an array of string literals, e.g. `[\"-e\", \"1000\"]`"));
                        };
                        for e in elems {
                            a.scheduler_args.push(string(e, "scheduler_args")?);
                        }
                    }
                    "expect_scx_error" => {
                        let s = string(v, &key)?;
                        if s.is_empty() {
                            return Err(syn::Error::new_spanned(v, "`expect_scx_error` takes the text the sched_ext error must contain; it must not be empty"));
                        }
                        a.expect_scx_error = Some(s);
                    }
                    // sched_ext: a path to a `const Scheduler` (ktstr_runtime::scheduler).
                    "scheduler" => match v {
                        Expr::Path(p) => a.scheduler = Some(quote!(#p).to_string()),
                        _ => {
                            return Err(syn::Error::new_spanned(
                                v,
                                "`scheduler` takes the name of a `const Scheduler`, e.g. `scheduler = SIMPLE`",
                            ))
                        }
                    },
                    _ => {
                        return Err(syn::Error::new_spanned(
                            meta.path(),
                            format!("unknown ktstr_test attribute `{key}`; accepted keys: {KEYS}"),
                        ))
                    }
                }
            }
            Meta::List(_) => {
                return Err(syn::Error::new_spanned(meta, format!("expected `key = value` or a flag; accepted keys: {KEYS}")))
            }
        }
    }
    if let (Some(c), Some(t)) = (cpus_span, topo_span) {
        let mut e = syn::Error::new(t, "give either `cpus` or `numa_nodes`/`llcs`/`cores`/`threads`, not both");
        e.combine(syn::Error::new(c, "`cpus` given here"));
        return Err(e);
    }
    if let Some(span) = topo_span {
        let total: u64 = [a.numa_nodes, a.llcs, a.cores, a.threads].iter().map(|v| v.unwrap_or(1) as u64).product();
        if total > MAX_CPUS {
            return Err(syn::Error::new(span, format!("topology asks for {total} CPUs; ktstr supports at most {MAX_CPUS}")));
        }
    }
    // Guest RAM is split evenly over the NUMA nodes; a split no backend
    // can give is the test's bug, so a compile error rather than a skip.
    if let (Some(n), Some(m)) = (a.numa_nodes, a.memory_mib) {
        if m % n as u64 != 0 {
            let span = metas.iter().find(|x| x.path().is_ident("memory_mib")).map(|x| x.span()).unwrap_or_else(Span::call_site);
            return Err(syn::Error::new(
                span,
                format!("memory_mib = {m} does not split evenly over {n} NUMA nodes; use a multiple of {n}"),
            ));
        }
    }
    if a.scheduler.is_none() && (!a.scheduler_args.is_empty() || a.expect_scx_error.is_some()) {
        let span = metas
            .iter()
            .find(|x| x.path().is_ident("scheduler_args") || x.path().is_ident("expect_scx_error"))
            .map(|x| x.span())
            .unwrap_or_else(Span::call_site);
        return Err(syn::Error::new(span, "`scheduler_args` and `expect_scx_error` need a `scheduler = ...`"));
    }
    if a.expect_err && a.expect_scx_error.is_some() {
        let span = metas.iter().find(|x| x.path().is_ident("expect_err")).map(|x| x.span()).unwrap_or_else(Span::call_site);
        return Err(syn::Error::new(span, "give either `expect_err` (the body fails) or `expect_scx_error` (the scheduler is ejected), not both"));
    }
    if let (Some(lo), Some(hi)) = (a.min_cpus, a.max_cpus) {
        if lo > hi {
            let span = metas.iter().find(|x| x.path().is_ident("max_cpus")).map(|x| x.span()).unwrap_or_else(Span::call_site);
            return Err(syn::Error::new(span, format!("max_cpus = {hi} is below min_cpus = {lo}: no preset could run this test")));
        }
    }
    if a.host_only && a_constrained(&a) {
        let span = metas.iter().find(|m| m.path().is_ident("host_only")).map(|m| m.span()).unwrap_or_else(Span::call_site);
        return Err(syn::Error::new(span, "`host_only` tests have no gauntlet variants; drop the gauntlet/min_*/max_cpus/requires_smt keys"));
    }
    if a.host_only && (a.cpus.is_some() || topo_span.is_some() || a.memory_mib.is_some() || a.cmdline.is_some() || a.scheduler.is_some() || a.cold_boot) {
        let span = metas.iter().find(|m| m.path().is_ident("host_only")).map(|m| m.span()).unwrap_or_else(Span::call_site);
        return Err(syn::Error::new(span, "`host_only` tests never boot a VM; drop the topology/memory_mib/cmdline/scheduler/cold_boot keys"));
    }
    Ok(a)
}

fn a_constrained(a: &Attrs) -> bool {
    a.gauntlet.is_some() || a.min_cpus.is_some() || a.max_cpus.is_some() || a.min_llcs.is_some() || a.min_numa_nodes.is_some() || a.requires_smt
}

/// Lets a body end in a chain of checks that return `Result<&Report>`
/// (`report.assert_no_starvation()?.assert_fair_share(0.25)`): a trailing
/// method call is evaluated while the body's locals are alive and turned
/// into `Result<()>`. Other tails are left as written.
fn wrap_method_tail(func: &mut ItemFn) {
    if let Some(syn::Stmt::Expr(e @ Expr::MethodCall(_), None)) = func.block.stmts.last_mut() {
        let inner = e.clone();
        *e = syn::parse_quote!({
            let __ktstr_tail = #inner;
            ::ktstr_runtime::__private::tail_result(__ktstr_tail)
        });
    }
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let attrs = parse_attrs(attr)?;
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if sig.asyncness.is_some() || !sig.generics.params.is_empty() || sig.inputs.len() != 1 || matches!(sig.output, syn::ReturnType::Default) {
        return Err(syn::Error::new_spanned(
            sig,
            "a #[ktstr_test] function has the shape `fn name(ctx: &Ctx) -> Result<()>` (not async, no generics)",
        ));
    }
    let mut func = func;
    wrap_method_tail(&mut func);
    let ident = &func.sig.ident;
    let name = ident.to_string();
    let def = format_ident!("__KTSTR_TEST_{}", name.to_uppercase());

    let mut fields = Vec::new();
    let topo = match (attrs.cpus, attrs.numa_nodes, attrs.llcs, attrs.cores, attrs.threads) {
        (Some(c), ..) => Some(quote!(::ktstr_runtime::vmm::Topology::new(1, 1, #c, 1))),
        (None, None, None, None, None) => None,
        (None, n, l, c, t) => {
            let (n, l, c, t) = (n.unwrap_or(1), l.unwrap_or(1), c.unwrap_or(1), t.unwrap_or(1));
            Some(quote!(::ktstr_runtime::vmm::Topology::new(#n, #l, #c, #t)))
        }
    };
    if let Some(t) = topo {
        fields.push(quote!(topology: #t));
    }
    if let Some(m) = attrs.memory_mib {
        fields.push(quote!(memory_mib: #m));
    }
    if let Some(t) = attrs.timeout_s {
        fields.push(quote!(timeout_s: #t));
    }
    let (host_only, expect_err, cold_boot) = (attrs.host_only, attrs.expect_err, attrs.cold_boot);
    if let Some(c) = &attrs.cmdline {
        fields.push(quote!(cmdline: #c));
    }
    if !attrs.include_files.is_empty() {
        // Relative paths resolve against the test crate; a missing file is
        // a compile error rather than a guest-side surprise.
        let base = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let mut paths = Vec::new();
        for f in &attrs.include_files {
            let p = if f.starts_with('/') { f.clone() } else { format!("{base}/{f}") };
            if !base.is_empty() && !std::path::Path::new(&p).is_file() {
                return Err(syn::Error::new(Span::call_site(), format!("include_files: `{p}` is not a file")));
            }
            paths.push(p);
        }
        fields.push(quote!(include_files: &[#(#paths),*]));
        // Embedded too, so the binary does not depend on the source tree
        // (and cargo rebuilds it when a file changes).
        fields.push(quote!(include_data: &[#(::core::include_bytes!(#paths) as &'static [u8]),*]));
    }
    if !attrs.host_tools.is_empty() {
        // Found on the host at run time, not embedded: a missing tool skips.
        let tools = &attrs.host_tools;
        fields.push(quote!(host_tools: &[#(#tools),*]));
    }
    if let Some(s) = &attrs.scheduler {
        let path: syn::ExprPath = syn::parse_str(s)?;
        fields.push(quote!(scheduler: ::core::option::Option::Some(&#path)));
    }
    let mut checks = Vec::new();
    if let Some(v) = attrs.max_gap_ms {
        checks.push(quote!(max_gap_ms: ::core::option::Option::Some(#v)));
    }
    if let Some(v) = attrs.max_wake_p99_us {
        checks.push(quote!(max_wake_p99_us: ::core::option::Option::Some(#v)));
    }
    if let Some(v) = attrs.max_spread_pct {
        checks.push(quote!(max_spread_pct: ::core::option::Option::Some(#v)));
    }
    if let Some(v) = attrs.max_migrations_per_s {
        checks.push(quote!(max_migrations_per_s: ::core::option::Option::Some(#v)));
    }
    if attrs.not_starved {
        checks.push(quote!(not_starved: true));
    }
    if attrs.isolated {
        checks.push(quote!(isolated: true));
    }
    if !checks.is_empty() {
        fields.push(quote!(checks: ::ktstr_runtime::checks::Checks { #(#checks,)* ..::ktstr_runtime::checks::Checks::NONE }));
    }
    if !attrs.scheduler_args.is_empty() {
        let args = &attrs.scheduler_args;
        fields.push(quote!(scheduler_args: &[#(#args),*]));
    }
    if let Some(e) = &attrs.expect_scx_error {
        fields.push(quote!(expect_scx_error: ::core::option::Option::Some(#e)));
    }
    if a_constrained(&attrs) {
        let g = attrs.gauntlet.unwrap_or(true);
        let smt = attrs.requires_smt;
        let mut c = vec![quote!(gauntlet: #g), quote!(requires_smt: #smt)];
        for (k, v) in [("min_cpus", attrs.min_cpus), ("max_cpus", attrs.max_cpus), ("min_llcs", attrs.min_llcs), ("min_numa_nodes", attrs.min_numa_nodes)] {
            if let Some(v) = v {
                let k = format_ident!("{k}");
                c.push(quote!(#k: #v));
            }
        }
        fields.push(quote!(gauntlet: ::ktstr_runtime::preset::Constraints { #(#c,)* ..::ktstr_runtime::preset::Constraints::DEFAULT }));
    }
    // Without memory_mib the default must split over the nodes too: a
    // const check on the runtime's default, so the two cannot drift.
    let memory_check = match (attrs.numa_nodes, attrs.memory_mib) {
        (Some(n), None) if n > 1 => {
            let msg = format!(
                "#[ktstr_test] {name}: the default memory_mib does not split evenly over {n} NUMA nodes; give a memory_mib that is a multiple of {n}"
            );
            let n = n as u64;
            quote!(const _: () = ::core::assert!(::ktstr_runtime::registry::TestDef::DEFAULT.memory_mib % #n == 0, #msg);)
        }
        _ => quote!(),
    };
    let ignore = if name.starts_with("demo_") { quote!(#[ignore = "demo_ tests are ignored by default"]) } else { quote!() };

    Ok(quote! {
        #func

        #memory_check

        #[::ktstr_runtime::__private::linkme::distributed_slice(::ktstr_runtime::registry::TESTS)]
        #[linkme(crate = ::ktstr_runtime::__private::linkme)]
        #[allow(non_upper_case_globals)]
        static #def: ::ktstr_runtime::registry::TestDef = ::ktstr_runtime::registry::TestDef {
            name: #name,
            module_path: ::core::module_path!(),
            func: #ident,
            host_only: #host_only,
            expect_err: #expect_err,
            cold_boot: #cold_boot,
            file: ::core::file!(),
            line: ::core::line!(),
            #(#fields,)*
            ..::ktstr_runtime::registry::TestDef::DEFAULT
        };

        /// Plain `cargo test` entry; nextest lists `ktstr/...` names instead.
        #[allow(non_snake_case)]
        mod #ident {
            #[test]
            #ignore
            fn ktstr() {
                ::ktstr_runtime::dispatch::cargo_test(&super::#def);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        parse_attrs(src.parse().unwrap()).unwrap_err().to_string()
    }

    #[test]
    fn accepts_the_documented_keys() {
        let a = parse_attrs(
            "cpus = 2, memory_mib = 512, timeout_s = 30, expect_err, cmdline = \"quiet\"".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(a.cpus, Some(2));
        assert_eq!(a.memory_mib, Some(512));
        assert_eq!(a.timeout_s, Some(30));
        assert!(a.expect_err && !a.host_only);
        assert_eq!(a.cmdline.as_deref(), Some("quiet"));
        let a = parse_attrs("numa_nodes = 2, llcs = 2, cores = 2, threads = 2, host_only = false".parse().unwrap()).unwrap();
        assert_eq!((a.numa_nodes, a.llcs, a.cores, a.threads), (Some(2), Some(2), Some(2), Some(2)));
        assert_eq!(parse_attrs(TokenStream2::new()).unwrap(), Attrs::default());
        let a = parse_attrs("max_gap_ms = 50, max_wake_p99_us = 900, max_spread_pct = 12.5, max_migrations_per_s = 3, not_starved, isolated = true".parse().unwrap()).unwrap();
        assert_eq!((a.max_gap_ms, a.max_wake_p99_us, a.max_spread_pct, a.max_migrations_per_s), (Some(50), Some(900), Some(12.5), Some(3.0)));
        assert!(a.not_starved && a.isolated);
        assert!(parse_attrs("cold_boot".parse().unwrap()).unwrap().cold_boot);
        assert!(parse_attrs("cold_boot = true".parse().unwrap()).unwrap().cold_boot);
        assert!(!parse_attrs("cold_boot = false".parse().unwrap()).unwrap().cold_boot);
        let a = parse_attrs("include_files = [\"a\", \"b\"]".parse().unwrap()).unwrap();
        assert_eq!(a.include_files, ["a", "b"]);
        let a = parse_attrs("min_cpus = 4, max_cpus = 64, min_llcs = 2, min_numa_nodes = 2, requires_smt".parse().unwrap()).unwrap();
        assert_eq!((a.min_cpus, a.max_cpus, a.min_llcs, a.min_numa_nodes, a.requires_smt), (Some(4), Some(64), Some(2), Some(2), true));
        assert_eq!(parse_attrs("gauntlet = false".parse().unwrap()).unwrap().gauntlet, Some(false));
        let a = parse_attrs("host_tools = [\"bpftool\", \"/usr/bin/script\"]".parse().unwrap()).unwrap();
        assert_eq!(a.host_tools, ["bpftool", "/usr/bin/script"]);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(err("cpus = 0").contains("between 1 and 256"));
        assert!(err("min_cpus = 8, max_cpus = 4").contains("below min_cpus"));
        assert!(err("scheduler_args = [\"-v\"]").contains("need a `scheduler"));
        assert!(err("expect_scx_error = \"stall\"").contains("need a `scheduler"));
        assert!(err("scheduler = Q, expect_scx_error = \"\"").contains("must not be empty"));
        assert!(err("scheduler = Q, expect_err, expect_scx_error = \"x\"").contains("not both"));
        assert!(err("scheduler = Q, scheduler_args = \"-v\"").contains("array"));
        let a = parse_attrs("scheduler = Q, scheduler_args = [\"-e\", \"9\"], expect_scx_error = \"stall\"".parse().unwrap()).unwrap();
        assert_eq!((a.scheduler_args, a.expect_scx_error.as_deref()), (vec!["-e".to_string(), "9".to_string()], Some("stall")));
        assert!(err("max_cpus = 300").contains("between 1 and 256"));
        assert!(err("gauntlet = 0").contains("`true` or `false`"));
        assert!(err("host_only, gauntlet = false").contains("no gauntlet variants"));
        assert!(err("host_only, requires_smt").contains("no gauntlet variants"));
        assert!(err("cpus = 257").contains("between 1 and 256"));
        assert!(err("cpus = \"2\"").contains("integer literal"));
        assert!(err("memory_mib = 16").contains("between 64"));
        assert!(err("timeout_s = 0").contains("between 1"));
        assert!(err("cpus = 2, cores = 2").contains("not both"));
        assert!(err("numa_nodes = 4, llcs = 4, cores = 8, threads = 4").contains("512 CPUs"));
        assert!(parse_attrs("numa_nodes = 4, llcs = 4, cores = 8, threads = 2".parse().unwrap()).is_ok());
        assert!(err("cpu = 2").contains("unknown ktstr_test attribute `cpu`"));
        assert!(err("cpus = 2, cpus = 3").contains("given twice"));
        assert!(err("host_only = 1").contains("`true` or `false`"));
        assert!(err("max_gap_ms = 0").contains("`max_gap_ms` must be between 1"));
        let neg = err("max_spread_pct = -1.0");
        assert!(neg.contains("must be at least 0") || neg.contains("takes a number"), "{neg}");
        assert!(err("max_spread_pct = \"5\"").contains("takes a number"));
        assert!(err("max_wake_p99_us").contains("needs a value"));
        assert!(err("cpus").contains("needs a value"));
        assert!(err("cmdline = \"ktstr.test=x\"").contains("ktstr.*"));
        assert!(err("include_files = \"x\"").contains("array"));
        assert!(err("host_tools = \"bpftool\"").contains("array"));
        assert!(err("host_tools = [\"bin/bpftool\"]").contains("absolute paths"));
        assert!(err("host_tools = [\"bpf tool\"]").contains("program names"));
        assert!(err("host_tools = [\"/usr/sbin/\"]").contains("program names"));
        assert!(err("host_tools = [\"sh\", \"/bin/sh\"]").contains("two tools named `sh`"));
        assert!(err("host_only, cpus = 2").contains("never boot a VM"));
        assert!(err("scheduler = \"scx_simple\"").contains("const Scheduler"));
        assert!(err("host_only, scheduler = SIMPLE").contains("never boot a VM"));
        assert!(err("numa_nodes = 3, memory_mib = 512").contains("does not split evenly over 3 NUMA nodes"));
        assert!(parse_attrs("numa_nodes = 2, memory_mib = 512".parse().unwrap()).is_ok());
        assert_eq!(parse_attrs("scheduler = crate::SIMPLE".parse().unwrap()).unwrap().scheduler.as_deref(), Some("crate :: SIMPLE"));
    }

    #[test]
    fn rejects_bad_function_shapes() {
        let e = expand(TokenStream2::new(), "async fn f(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap());
        assert!(e.unwrap_err().to_string().contains("fn name(ctx: &Ctx)"));
        let e = expand(TokenStream2::new(), "fn f() {}".parse().unwrap());
        assert!(e.is_err());
        let c = expand("max_cpus = 16, requires_smt".parse().unwrap(), "fn t(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(c.contains("gauntlet : :: ktstr_runtime :: preset :: Constraints { gauntlet : true , requires_smt : true , max_cpus : 16u32"), "{c}");
        let plain = expand("cpus = 2".parse().unwrap(), "fn t(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap()).unwrap().to_string();
        assert!(!plain.contains("Constraints"), "no keys: the runtime default");
        let ok = expand("cpus = 2".parse().unwrap(), "fn demo_x(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(ok.contains("__KTSTR_TEST_DEMO_X") && ok.contains("ignore"));
        assert!(!ok.contains("tail_result"), "an Ok(()) tail is left alone");
        let chained = expand(TokenStream2::new(), "fn t(ctx: &Ctx) -> Result<()> { let r = x(); r.a()?.b(0.25) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(chained.contains("let __ktstr_tail = r . a () ? . b (0.25)"), "{chained}");
        // The default memory is checked against the nodes at compile time.
        let three = expand("numa_nodes = 3".parse().unwrap(), "fn t(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(three.contains("TestDef :: DEFAULT . memory_mib % 3u64 == 0"), "{three}");
        let two = expand("numa_nodes = 2, memory_mib = 512".parse().unwrap(), "fn t(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(!two.contains("DEFAULT . memory_mib"), "{two}");
        let checked = expand("max_gap_ms = 50, isolated".parse().unwrap(), "fn t(ctx: &Ctx) -> Result<()> { Ok(()) }".parse().unwrap())
            .unwrap()
            .to_string();
        assert!(checked.contains("checks : :: ktstr_runtime :: checks :: Checks { max_gap_ms : :: core :: option :: Option :: Some (50u64) , isolated : true ,"), "{checked}");
    }
}
