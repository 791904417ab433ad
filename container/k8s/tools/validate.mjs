// Offline checks of rendered Kubernetes manifests (see ../check).
//
//   node validate.mjs manifests FILE...      schema + security properties of
//                                            each file (one rendered overlay)
//   node validate.mjs self-test FILE         every check below must catch a
//                                            deliberately broken copy of FILE
//   node validate.mjs metrics SRC_DIR FILE...  every relay_/bunny_ metric that
//                                            alert rules or dashboards name is
//                                            one the code exports
//
// Exits 1 and prints every problem, one per line, naming the object.
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";

const modelPackages = {
  "cert-manager.io": "@kubernetes-models/cert-manager",
};

async function modelFor(apiVersion, kind) {
  const group = apiVersion.includes("/") ? apiVersion.split("/")[0] : "";
  const pkg = modelPackages[group] ?? "kubernetes-models";
  let mod;
  try {
    mod = await import(`${pkg}/${apiVersion}`);
  } catch {
    return null;
  }
  return mod[kind] ?? null;
}

const name = (o) => `${o.kind}/${o.metadata?.namespace ? o.metadata.namespace + "/" : ""}${o.metadata?.name}`;

function podSpecOf(o) {
  switch (o.kind) {
    case "Pod":
      return o.spec;
    case "Deployment":
    case "StatefulSet":
    case "DaemonSet":
    case "ReplicaSet":
    case "Job":
      return o.spec?.template?.spec;
    case "CronJob":
      return o.spec?.jobTemplate?.spec?.template?.spec;
    default:
      return null;
  }
}
const podLabelsOf = (o) =>
  o.kind === "Pod" ? o.metadata?.labels ?? {} : (o.kind === "CronJob" ? o.spec?.jobTemplate?.spec?.template : o.spec?.template)?.metadata?.labels ?? {};

function selects(selector, labels) {
  // NetworkPolicy podSelector: {} selects every pod; only matchLabels is used here.
  if (selector?.matchExpressions?.length) return false;
  return Object.entries(selector?.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
}

function isCidr(s) {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(s ?? "");
  if (m) return m.slice(1, 5).every((x) => +x <= 255) && +m[5] <= 32;
  const v6 = /^([0-9a-fA-F:]+)\/(\d{1,3})$/.exec(s ?? "");
  return !!v6 && v6[1].includes(":") && +v6[2] <= 128;
}

// Ports that only the monitoring namespace may reach.
const OPS_PORTS = new Set([9090, "ops"]);
const MONITORING = { "kubernetes.io/metadata.name": "monitoring" };

async function checkSchema(docs, problems) {
  for (const o of docs) {
    if (!o?.apiVersion || !o?.kind) {
      problems.push(`an object without apiVersion/kind: ${JSON.stringify(o).slice(0, 80)}`);
      continue;
    }
    const Model = await modelFor(o.apiVersion, o.kind);
    if (!Model) {
      problems.push(`${name(o)}: no schema known for ${o.apiVersion} ${o.kind}`);
      continue;
    }
    try {
      new Model(structuredClone(o)).validate();
    } catch (e) {
      problems.push(`${name(o)}: schema: ${e.message}`);
    }
  }
}

function checkContainer(o, c, pod, problems) {
  const where = `${name(o)} container ${c.name}`;
  const sc = c.securityContext ?? {};
  const psc = pod.securityContext ?? {};
  if (!(sc.runAsNonRoot === true || (psc.runAsNonRoot === true && sc.runAsNonRoot !== false)))
    problems.push(`${where}: runAsNonRoot is not true`);
  if ((sc.runAsUser ?? psc.runAsUser) === 0) problems.push(`${where}: runs as UID 0`);
  if (sc.readOnlyRootFilesystem !== true) problems.push(`${where}: readOnlyRootFilesystem is not true`);
  if (sc.allowPrivilegeEscalation !== false) problems.push(`${where}: allowPrivilegeEscalation is not false`);
  if (sc.privileged === true) problems.push(`${where}: privileged`);
  if (!(sc.capabilities?.drop ?? []).includes("ALL")) problems.push(`${where}: capabilities do not drop ALL`);
  if ((sc.capabilities?.add ?? []).length) problems.push(`${where}: adds capabilities ${sc.capabilities.add}`);
  const seccomp = sc.seccompProfile?.type ?? psc.seccompProfile?.type;
  if (seccomp !== "RuntimeDefault" && seccomp !== "Localhost") problems.push(`${where}: seccomp profile is not RuntimeDefault`);
  for (const kind of ["requests", "limits"])
    for (const r of ["cpu", "memory"])
      if (!c.resources?.[kind]?.[r]) problems.push(`${where}: no resources.${kind}.${r}`);
  if (!/[:@]/.test(c.image?.split("/").pop() ?? "") || /:latest$/.test(c.image))
    problems.push(`${where}: image ${c.image} has no fixed tag or digest`);
  // relay and bunny themselves: probed on their ops listener.
  const program = (c.args ?? c.command ?? [])[0];
  if (program === "relay" || program === "bunny") {
    if (c.readinessProbe?.httpGet?.path !== "/readyz") problems.push(`${where}: no readiness probe on /readyz`);
    if (c.livenessProbe?.httpGet?.path !== "/healthz") problems.push(`${where}: no liveness probe on /healthz`);
  }
  const volumes = new Map((pod.volumes ?? []).map((v) => [v.name, v]));
  for (const m of c.volumeMounts ?? []) {
    const v = volumes.get(m.name);
    if ((v?.secret || v?.configMap || v?.projected) && m.readOnly !== true)
      problems.push(`${where}: ${v.secret ? "Secret" : "ConfigMap"} volume ${m.name} is not mounted readOnly`);
  }
}

function checkWorkload(o, docs, problems) {
  const pod = podSpecOf(o);
  if (!pod) return;
  const ns = o.metadata?.namespace;
  if (pod.automountServiceAccountToken !== false) problems.push(`${name(o)}: automountServiceAccountToken is not false`);
  const sa = pod.serviceAccountName;
  if (!sa || sa === "default") problems.push(`${name(o)}: runs as the default ServiceAccount`);
  else {
    const account = docs.find((d) => d.kind === "ServiceAccount" && d.metadata?.name === sa && d.metadata?.namespace === ns);
    if (!account) problems.push(`${name(o)}: ServiceAccount ${sa} is not part of the manifests`);
    else if (account.automountServiceAccountToken !== false)
      problems.push(`ServiceAccount ${sa}: automountServiceAccountToken is not false`);
  }
  for (const f of ["hostNetwork", "hostPID", "hostIPC"]) if (pod[f]) problems.push(`${name(o)}: ${f}`);
  for (const v of pod.volumes ?? []) if (v.hostPath) problems.push(`${name(o)}: hostPath volume ${v.name}`);
  if (pod.securityContext?.runAsNonRoot !== true) problems.push(`${name(o)}: pod runAsNonRoot is not true`);
  for (const c of [...(pod.initContainers ?? []), ...(pod.containers ?? [])]) checkContainer(o, c, pod, problems);

  // Every pod is selected by NetworkPolicies that, together, govern both
  // directions: otherwise whatever they do not govern is wide open.
  const labels = podLabelsOf(o);
  const policies = docs.filter((d) => d.kind === "NetworkPolicy" && d.metadata?.namespace === ns && selects(d.spec?.podSelector, labels));
  if (!policies.length) problems.push(`${name(o)}: its pods are not selected by any NetworkPolicy`);
  for (const dir of ["Ingress", "Egress"])
    if (policies.length && !policies.some((p) => (p.spec?.policyTypes ?? []).includes(dir)))
      problems.push(`${name(o)}: no NetworkPolicy governs its ${dir.toLowerCase()}`);
}

function checkNetworkPolicy(o, problems) {
  for (const dir of ["ingress", "egress"]) {
    for (const [i, rule] of (o.spec?.[dir] ?? []).entries()) {
      const where = `${name(o)} ${dir}[${i}]`;
      if (!rule.ports?.length) problems.push(`${where}: allows every port`);
      const peers = rule[dir === "ingress" ? "from" : "to"] ?? [];
      if (!peers.length) problems.push(`${where}: allows every peer`);
      for (const p of peers) {
        if (p.ipBlock) {
          if (!isCidr(p.ipBlock.cidr)) problems.push(`${where}: ipBlock ${p.ipBlock.cidr} is not a CIDR (parameter not set?)`);
          else if (/\/0$/.test(p.ipBlock.cidr)) problems.push(`${where}: ipBlock ${p.ipBlock.cidr} is everything`);
        }
      }
      if (dir === "ingress" && (rule.ports ?? []).some((p) => OPS_PORTS.has(p.port))) {
        const onlyMonitoring = peers.every(
          (p) => !p.ipBlock && !p.podSelector && Object.entries(MONITORING).every(([k, v]) => p.namespaceSelector?.matchLabels?.[k] === v),
        );
        if (!onlyMonitoring) problems.push(`${where}: the ops port is open to more than the monitoring namespace`);
      }
    }
  }
}

function checkSecurity(docs, problems) {
  for (const o of docs) {
    checkWorkload(o, docs, problems);
    if (o.kind === "NetworkPolicy") checkNetworkPolicy(o, problems);
    if (["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"].includes(o.kind))
      problems.push(`${name(o)}: RBAC grants have no place here (relay and bunny never call the API server)`);
    if (o.kind === "Namespace" && o.metadata?.labels?.["pod-security.kubernetes.io/enforce"] !== "restricted")
      problems.push(`${name(o)}: Pod Security Standard "restricted" is not enforced`);
    if (o.kind === "Service" && o.spec?.type === "LoadBalancer") {
      const a = o.metadata?.annotations ?? {};
      if (a["service.beta.kubernetes.io/aws-load-balancer-scheme"] !== "internal")
        problems.push(`${name(o)}: load balancer is not internal`);
      if (a["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] !== "ip")
        problems.push(`${name(o)}: load balancer does not target pod IPs`);
    }
    if (o.kind === "Service" && o.spec?.type === "NodePort") problems.push(`${name(o)}: NodePort exposes every node`);
  }
  // A namespace's pods are denied by default.
  for (const ns of new Set(docs.filter((d) => podSpecOf(d)).map((d) => d.metadata?.namespace))) {
    const deny = docs.some(
      (d) =>
        d.kind === "NetworkPolicy" && d.metadata?.namespace === ns && Object.keys(d.spec?.podSelector ?? {}).length === 0 &&
        ["Ingress", "Egress"].every((t) => (d.spec?.policyTypes ?? []).includes(t)) && !d.spec?.ingress?.length && !d.spec?.egress?.length,
    );
    if (!deny) problems.push(`namespace ${ns}: no default-deny NetworkPolicy`);
  }
}

// The relay configuration a relay container runs with: the ConfigMap mounted
// over the directory of its --config file, then its --set overrides.
function relayConfigOf(o, c, pod, docs) {
  const args = c.args ?? c.command ?? [];
  const file = args[args.indexOf("--config") + 1];
  if (args.indexOf("--config") < 0 || !file) return null;
  const mount = (c.volumeMounts ?? []).find((m) => file.startsWith(m.mountPath.replace(/\/?$/, "/")));
  const volume = (pod.volumes ?? []).find((v) => v.name === mount?.name);
  const map = docs.find((d) => d.kind === "ConfigMap" && d.metadata?.name === volume?.configMap?.name && d.metadata?.namespace === o.metadata?.namespace);
  const text = map?.data?.[file.slice(mount.mountPath.replace(/\/?$/, "/").length)];
  if (!text) return null;
  let config;
  try {
    config = JSON.parse(text);
  } catch {
    return null;
  }
  for (const [i, a] of args.entries()) {
    if (a !== "--set") continue;
    const [key, value] = (args[i + 1] ?? "").split(/=(.*)/s);
    const path = key.split(".");
    let at = config;
    for (const k of path.slice(0, -1)) at = at[k] ??= {};
    at[path.at(-1)] = value;
  }
  return config;
}

const selectsPod = (selector, labels) => !!selector && Object.keys(selector.matchLabels ?? {}).length > 0 && selects(selector, labels);

// More than one relay on one journal: only with the postgres backend, and
// then as the HA overlay promises (docs/ha.md): no volume, one pod per zone
// and node, the DSN from a read-only 0400 Secret file and nowhere else,
// egress to the database and DNS only, a grace period longer than the
// drain, a disruption budget, and a load balancer that keeps the standby
// registered and health-checks the port only the leader listens on.
function checkHa(docs, problems) {
  for (const o of docs) {
    const pod = podSpecOf(o);
    if (!pod) continue;
    for (const c of pod.containers ?? []) {
      if ((c.args ?? c.command ?? [])[0] !== "relay") continue;
      const where = `${name(o)} container ${c.name}`;
      const config = relayConfigOf(o, c, pod, docs);
      const postgres = config?.journal?.backend === "postgres";
      const replicas = o.spec?.replicas ?? 1;
      if (!postgres) {
        if (replicas > 1) problems.push(`${where}: ${replicas} replicas on a file journal (only journal.backend "postgres" has a leader)`);
        continue;
      }
      if (replicas < 2) problems.push(`${where}: journal.backend "postgres" with ${replicas} replica: no standby`);
      if (o.spec?.volumeClaimTemplates?.length || (pod.volumes ?? []).some((v) => v.persistentVolumeClaim || v.ephemeral))
        problems.push(`${where}: a PersistentVolume with the postgres journal (the database is the journal)`);
      const labels = podLabelsOf(o);
      const spread = (pod.topologySpreadConstraints ?? []).find(
        (t) => t.topologyKey === "topology.kubernetes.io/zone" && t.whenUnsatisfiable === "DoNotSchedule" && selectsPod(t.labelSelector, labels),
      );
      if (!spread) problems.push(`${where}: no topology spread across zones with whenUnsatisfiable DoNotSchedule`);
      const anti = pod.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? [];
      if (!anti.some((t) => t.topologyKey === "kubernetes.io/hostname" && selectsPod(t.labelSelector, labels)))
        problems.push(`${where}: no required pod anti-affinity by kubernetes.io/hostname`);

      const dsn = config.journal.postgres?.dsn_file ?? "";
      const mount = (c.volumeMounts ?? []).find((m) => dsn.startsWith(m.mountPath.replace(/\/?$/, "/")));
      const volume = (pod.volumes ?? []).find((v) => v.name === mount?.name);
      if (!volume?.secret) problems.push(`${where}: journal.postgres.dsn_file ${dsn || "(unset)"} is not in a mounted Secret`);
      else {
        const key = dsn.slice(mount.mountPath.replace(/\/?$/, "/").length);
        const item = volume.secret.items?.find((i) => i.path === key);
        const mode = item?.mode ?? volume.secret.defaultMode ?? 0o644;
        if (mode !== 0o400) problems.push(`${where}: the DSN file has mode 0${mode.toString(8)}, not 0400`);
        if (mount.readOnly !== true) problems.push(`${where}: the DSN Secret is not mounted readOnly`);
      }
      const secretNames = new Set((pod.volumes ?? []).filter((v) => v.secret && v.name === mount?.name).map((v) => v.secret.secretName));
      for (const e of c.env ?? [])
        if (secretNames.has(e.valueFrom?.secretKeyRef?.name) || /dsn|postgres|password|^PG/i.test(e.name))
          problems.push(`${where}: the database secret in environment variable ${e.name}`);
      for (const e of c.envFrom ?? []) if (e.secretRef) problems.push(`${where}: a Secret as environment (envFrom ${e.secretRef.name})`);
      if ((c.args ?? c.command ?? []).some((a) => /postgres(ql)?:\/\/|password=|dsn=|host=/i.test(a)))
        problems.push(`${where}: a connection string in the arguments`);

      const drain = Number(config.limits?.drain_timeout_ms ?? 30000);
      if (!((pod.terminationGracePeriodSeconds ?? 30) * 1000 > drain))
        problems.push(`${where}: terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds ?? 30} is not beyond limits.drain_timeout_ms ${drain}`);

      const ns = o.metadata?.namespace;
      const policies = docs.filter((d) => d.kind === "NetworkPolicy" && d.metadata?.namespace === ns && selects(d.spec?.podSelector, labels));
      let toDatabase = false;
      for (const p of policies)
        for (const [i, rule] of (p.spec?.egress ?? []).entries()) {
          const ports = (rule.ports ?? []).map((x) => x.port);
          const peers = rule.to ?? [];
          const dns = ports.every((x) => x === 53) && peers.every((x) => x.podSelector?.matchLabels?.["k8s-app"] === "kube-dns");
          const db = ports.length && ports.every((x) => x === 5432) && peers.every((x) => x.ipBlock || x.podSelector);
          if (db) toDatabase = true;
          if (!dns && !db) problems.push(`${name(p)} egress[${i}]: relay may reach more than the database (5432) and DNS`);
        }
      if (!toDatabase) problems.push(`${where}: no NetworkPolicy lets it reach the database on 5432`);

      if (!docs.some((d) => d.kind === "PodDisruptionBudget" && d.metadata?.namespace === ns && selectsPod(d.spec?.selector, labels)))
        problems.push(`${where}: no PodDisruptionBudget`);
      for (const s of docs.filter((d) => d.kind === "Service" && d.spec?.type === "LoadBalancer" && d.metadata?.namespace === ns && selects({ matchLabels: d.spec?.selector }, labels))) {
        const a = s.metadata?.annotations ?? {};
        const port = a["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"] ?? "traffic-port";
        const proto = (a["service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol"] ?? "tcp").toLowerCase();
        const apiCheck = proto === "tcp" && ["traffic-port", "8443"].includes(String(port));
        const opsCheck = proto === "http" && ["9090"].includes(String(port)) && a["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] === "/readyz";
        if (!apiCheck && !opsCheck) problems.push(`${name(s)}: the load balancer's health check does not follow leadership (TCP on the API port, or HTTP /readyz on ops)`);
        if (s.spec?.publishNotReadyAddresses !== true)
          problems.push(`${name(s)}: publishNotReadyAddresses is not true (a failover would wait for target registration)`);
      }
    }
  }
}

const load = (file) => YAML.parseAllDocuments(fs.readFileSync(file, "utf8")).map((d) => d.toJS()).filter(Boolean);

async function check(docs) {
  const problems = [];
  await checkSchema(docs, problems);
  checkSecurity(docs, problems);
  checkHa(docs, problems);
  return problems;
}

// Each mutation breaks one property; the checks must notice every one.
const find = (docs, pred) => {
  const o = docs.find(pred);
  if (!o) throw new Error("self-test: the manifests lack an object the mutation needs");
  return o;
};
const firstWorkload = (docs) => find(docs, (d) => podSpecOf(d));
const mutations = [
  ["container runs as root", "runAsNonRoot is not true", (d) => {
    const w = firstWorkload(d);
    podSpecOf(w).securityContext.runAsNonRoot = false;
    podSpecOf(w).containers[0].securityContext.runAsNonRoot = false;
  }],
  ["writable root filesystem", "readOnlyRootFilesystem is not true", (d) => {
    delete podSpecOf(firstWorkload(d)).containers[0].securityContext.readOnlyRootFilesystem;
  }],
  ["capabilities kept", "do not drop ALL", (d) => {
    podSpecOf(firstWorkload(d)).containers[0].securityContext.capabilities = {};
  }],
  ["privilege escalation", "allowPrivilegeEscalation", (d) => {
    podSpecOf(firstWorkload(d)).containers[0].securityContext.allowPrivilegeEscalation = true;
  }],
  ["service account token mounted", "automountServiceAccountToken is not false", (d) => {
    podSpecOf(firstWorkload(d)).automountServiceAccountToken = true;
  }],
  ["no seccomp", "seccomp", (d) => {
    const p = podSpecOf(firstWorkload(d));
    delete p.securityContext.seccompProfile;
    for (const c of p.containers) delete c.securityContext.seccompProfile;
  }],
  ["Secret mounted writable", "not mounted readOnly", (d) => {
    const p = podSpecOf(firstWorkload(d));
    const secret = p.volumes.find((v) => v.secret);
    for (const c of p.containers) for (const m of c.volumeMounts ?? []) if (m.name === secret.name) delete m.readOnly;
  }],
  ["no NetworkPolicy", "not selected by any NetworkPolicy", (d) => {
    for (let i = d.length - 1; i >= 0; --i) if (d[i].kind === "NetworkPolicy") d.splice(i, 1);
  }],
  ["parameter left unset", "is not a CIDR", (d) => {
    const p = find(d, (o) => o.kind === "NetworkPolicy" && JSON.stringify(o).includes("ipBlock"));
    const rules = p.spec.ingress?.find((r) => r.from?.some((x) => x.ipBlock)) ?? p.spec.egress.find((r) => r.to?.some((x) => x.ipBlock));
    (rules.from ?? rules.to).find((x) => x.ipBlock).ipBlock.cidr = "RELAY_CIDR";
  }],
  ["ops port open to all", "ops port is open", (d) => {
    const p = find(d, (o) => o.kind === "NetworkPolicy" && o.spec?.ingress?.some((r) => r.ports?.some((x) => x.port === 9090)));
    p.spec.ingress.find((r) => r.ports.some((x) => x.port === 9090)).from.push({ ipBlock: { cidr: "10.0.0.0/8" } });
  }],
  ["rule for every port", "allows every port", (d) => {
    const p = find(d, (o) => o.kind === "NetworkPolicy" && o.spec?.ingress?.length);
    delete p.spec.ingress[0].ports;
  }],
  ["RBAC grant", "RBAC grants", (d) => {
    const w = firstWorkload(d);
    d.push({ apiVersion: "rbac.authorization.k8s.io/v1", kind: "RoleBinding", metadata: { name: "x", namespace: w.metadata.namespace },
      roleRef: { apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name: "view" },
      subjects: [{ kind: "ServiceAccount", name: podSpecOf(w).serviceAccountName }] });
  }],
  ["schema violation", "schema:", (d) => {
    firstWorkload(d).spec.replicas = "two";
  }],
  ["no probes", "no readiness probe", (d) => {
    delete podSpecOf(firstWorkload(d)).containers[0].readinessProbe;
  }],
  ["floating image", "no fixed tag", (d) => {
    podSpecOf(firstWorkload(d)).containers[0].image = "registry.example.com/relay";
  }],
];

// Only for manifests that run relay on the postgres journal (aws-ha).
const relayWorkload = (docs) => find(docs, (d) => podSpecOf(d)?.containers?.some((c) => (c.args ?? [])[0] === "relay"));
const relayContainer = (docs) => podSpecOf(relayWorkload(docs)).containers.find((c) => (c.args ?? [])[0] === "relay");
const dsnVolume = (docs) => podSpecOf(relayWorkload(docs)).volumes.find((v) => v.secret && v.secret.secretName !== "relay-tls");
const haMutations = [
  ["one replica", "no standby", (d) => {
    relayWorkload(d).spec.replicas = 1;
  }],
  ["a PersistentVolume", "PersistentVolume with the postgres journal", (d) => {
    podSpecOf(relayWorkload(d)).volumes.push({ name: "journal", persistentVolumeClaim: { claimName: "journal" } });
  }],
  ["zone spread only preferred", "topology spread across zones", (d) => {
    for (const t of podSpecOf(relayWorkload(d)).topologySpreadConstraints) t.whenUnsatisfiable = "ScheduleAnyway";
  }],
  ["no anti-affinity", "anti-affinity by kubernetes.io/hostname", (d) => {
    delete podSpecOf(relayWorkload(d)).affinity;
  }],
  ["DSN file readable by all", "not 0400", (d) => {
    dsnVolume(d).secret.defaultMode = 0o444;
  }],
  ["DSN in the environment", "environment variable", (d) => {
    relayContainer(d).env = [{ name: "RELAY_DSN", valueFrom: { secretKeyRef: { name: dsnVolume(d).secret.secretName, key: "dsn" } } }];
  }],
  ["DSN in argv", "connection string in the arguments", (d) => {
    relayContainer(d).args.push("--set", "journal.postgres.dsn=host=db password=x");
  }],
  ["file journal on two replicas", "on a file journal", (d) => {
    relayContainer(d).args.push("--set", "journal.backend=file");
  }],
  ["grace period within the drain", "not beyond limits.drain_timeout_ms", (d) => {
    podSpecOf(relayWorkload(d)).terminationGracePeriodSeconds = 30;
  }],
  ["egress to everything on 443", "more than the database", (d) => {
    const p = find(d, (o) => o.kind === "NetworkPolicy" && o.spec?.egress?.length);
    p.spec.egress.push({ to: [{ ipBlock: { cidr: "10.0.0.0/8" } }], ports: [{ port: 443, protocol: "TCP" }] });
  }],
  ["no disruption budget", "no PodDisruptionBudget", (d) => {
    d.splice(d.findIndex((o) => o.kind === "PodDisruptionBudget"), 1);
  }],
  ["standby deregistered from the NLB", "publishNotReadyAddresses", (d) => {
    delete find(d, (o) => o.kind === "Service" && o.spec?.type === "LoadBalancer").spec.publishNotReadyAddresses;
  }],
];
const isHa = (docs) => docs.some((o) => {
  const pod = podSpecOf(o);
  return pod?.containers?.some((c) => (c.args ?? [])[0] === "relay" && relayConfigOf(o, c, pod, docs)?.journal?.backend === "postgres");
});

async function selfTest(file) {
  const failures = [];
  const clean = await check(load(file));
  if (clean.length) failures.push(`the unmodified manifests fail: ${clean.join("; ")}`);
  const all = isHa(load(file)) ? [...mutations, ...haMutations] : mutations;
  for (const [what, expect, mutate] of all) {
    const docs = load(file);
    mutate(docs);
    const problems = await check(docs);
    if (!problems.some((p) => p.includes(expect))) failures.push(`not caught: ${what} (expected "${expect}", got: ${problems.join("; ") || "nothing"})`);
  }
  return failures;
}

function exportedMetrics(srcDir) {
  const names = new Set();
  const walk = (dir) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.(cpp|h)$/.test(e.name)) for (const m of fs.readFileSync(p, "utf8").matchAll(/"((?:relay|bunny)_[a-z0-9_]+)[{"]/g)) names.add(m[1]);
    }
  };
  walk(srcDir);
  return names;
}

// Every PromQL expression in a rules file (YAML) or dashboard (JSON).
function expressions(file) {
  const exprs = [];
  const walk = (v) => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (v && typeof v === "object")
      for (const [k, x] of Object.entries(v)) (k === "expr" && typeof x === "string" ? exprs.push(x) : walk(x));
  };
  walk(file.endsWith(".json") ? JSON.parse(fs.readFileSync(file, "utf8")) : YAML.parse(fs.readFileSync(file, "utf8")));
  return exprs;
}

function checkMetrics(srcDir, files) {
  const known = exportedMetrics(srcDir);
  const problems = [];
  if (known.size < 20) problems.push(`found only ${known.size} metric names under ${srcDir}: wrong directory?`);
  for (const f of files) {
    const exprs = expressions(f);
    if (!exprs.length) problems.push(`${f}: no expressions`);
    for (const e of exprs)
      for (const [m] of e.matchAll(/\b(?:relay|bunny)_[a-z0-9_]+\b/g))
        if (!known.has(m.replace(/_(bucket|sum|count)$/, ""))) problems.push(`${f}: ${m} is not a metric relay or bunny exports`);
  }
  return problems;
}

const [mode, ...args] = process.argv.slice(2);
let problems;
if (mode === "manifests") {
  problems = [];
  for (const f of args) {
    const docs = load(f);
    if (!docs.length) problems.push(`${f}: no objects`);
    problems.push(...(await check(docs)).map((p) => `${path.basename(f)}: ${p}`));
  }
} else if (mode === "self-test") {
  problems = await selfTest(args[0]);
  const n = mutations.length + (isHa(load(args[0])) ? haMutations.length : 0);
  if (!problems.length) console.log(`self-test: all ${n} broken variants of ${path.basename(args[0])} caught`);
} else if (mode === "metrics") {
  problems = checkMetrics(args[0], args.slice(1));
} else {
  console.error("usage: validate.mjs manifests FILE... | self-test FILE | metrics SRC_DIR FILE...");
  process.exit(2);
}
for (const p of problems) console.error(p);
process.exit(problems.length ? 1 : 0);
