{{/*
Names, labels and shared pod fragments for the gpu-telemetry chart.
*/}}

{{- define "gpu-telemetry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full release name, cut to leave room for the longest component suffix. */}}
{{- define "gpu-telemetry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gpu-telemetry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "queue"). */}}
{{- define "gpu-telemetry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-telemetry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gpu-telemetry.labels" -}}
helm.sh/chart: {{ include "gpu-telemetry.chart" .root }}
{{ include "gpu-telemetry.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: gpu-telemetry
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "gpu-telemetry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-telemetry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference of one pipeline component: (dict "root" $ "values" .Values.queue). */}}
{{- define "gpu-telemetry.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- printf "%s%s:%s" .root.Values.image.registry .values.image.repository $tag }}
{{- end }}

{{/* Name of the Secret with the bearer tokens. */}}
{{- define "gpu-telemetry.tokenSecretName" -}}
{{- default (printf "%s-tokens" (include "gpu-telemetry.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "gpu-telemetry.queueServiceName" -}}
{{- printf "%s-queue" (include "gpu-telemetry.fullname" .) }}
{{- end }}

{{- define "gpu-telemetry.queueScheme" -}}
{{- if .Values.queue.tls.secretName }}https{{ else }}http{{ end }}
{{- end }}

{{/*
Comma-separated URLs of every queue replica, through the headless Service's
per-pod DNS names: http://<release>-queue-0.<release>-queue.<namespace>.svc:8500,...
*/}}
{{- define "gpu-telemetry.queueUrls" -}}
{{- $service := include "gpu-telemetry.queueServiceName" . -}}
{{- $scheme := include "gpu-telemetry.queueScheme" . -}}
{{- $urls := list -}}
{{- range $index := until (int .Values.queue.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s.%s.svc:%d" $scheme $service $index $service $.Release.Namespace (int $.Values.queue.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end }}

{{- define "gpu-telemetry.postgresqlName" -}}
{{- printf "%s-postgresql" (include "gpu-telemetry.fullname" .) }}
{{- end }}

{{- define "gpu-telemetry.postgresqlSecretName" -}}
{{- default (include "gpu-telemetry.postgresqlName" .) .Values.postgresql.existingSecret }}
{{- end }}

{{/*
DATABASE_URL as an env entry: from the external Secret, or assembled from the
bundled PostgreSQL's password with Kubernetes' $(VAR) expansion.
*/}}
{{- define "gpu-telemetry.databaseEnv" -}}
{{- if .Values.postgresql.enabled -}}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "gpu-telemetry.postgresqlSecretName" . }}
      key: password
- name: DATABASE_URL
  value: {{ printf "postgresql://%s:$(POSTGRES_PASSWORD)@%s.%s.svc:%d/%s" .Values.postgresql.username (include "gpu-telemetry.postgresqlName" .) .Release.Namespace (int .Values.postgresql.port) .Values.postgresql.database | quote }}
{{- else -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.external.existingSecret }}
      key: {{ .Values.database.external.key }}
{{- end }}
{{- end }}

{{/*
Hook phases of the migration Job, empty when it is an ordinary resource. An
external database is migrated before anything else is created or upgraded. The
bundled PostgreSQL only exists once the release's own objects are created, so
on first install the Job is an ordinary resource created with them, which keeps
`helm install --wait` from waiting on pods that wait for a post-install hook.
*/}}
{{- define "gpu-telemetry.migrationHooks" -}}
{{- if not .Values.postgresql.enabled }}pre-install,pre-upgrade
{{- else if .Release.IsUpgrade }}pre-upgrade
{{- end }}
{{- end }}

{{/* Volumes shared by the pods of the pipeline: a writable /tmp and the helper scripts. */}}
{{- define "gpu-telemetry.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
- name: scripts
  configMap:
    name: {{ include "gpu-telemetry.fullname" . }}-scripts
    defaultMode: 0444
{{- end }}

{{/*
Init container that blocks until the database schema is at the migrations' head
revision, so collectors and the API never run against an old schema.
*/}}
{{- define "gpu-telemetry.waitForSchema" -}}
- name: wait-for-schema
  image: {{ include "gpu-telemetry.image" (dict "root" . "values" .Values.migrations) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python"]
  args: ["/scripts/wait_for_schema.py", "--timeout", {{ .Values.migrations.schemaWaitTimeoutS | toString | quote }}]
  workingDir: /app
  env:
    {{- include "gpu-telemetry.databaseEnv" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.migrations.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: scripts
      mountPath: /scripts
      readOnly: true
{{- end }}

{{/* Standard env entries: (dict "prefix" "QUEUE" "values" .Values.queue). */}}
{{- define "gpu-telemetry.serverEnv" -}}
- name: {{ .prefix }}_HOST
  value: {{ .values.host | quote }}
- name: {{ .prefix }}_PORT
  value: {{ .values.port | toString | quote }}
- name: {{ .prefix }}_LOG_LEVEL
  value: {{ .values.logLevel | quote }}
{{- end }}

{{/* HTTP probes of one container: (dict "values" .Values.queue "port" "http"). */}}
{{- define "gpu-telemetry.probes" -}}
readinessProbe:
  httpGet:
    path: {{ .values.probes.readinessPath }}
    port: {{ .port }}
    {{- if .scheme }}
    scheme: {{ .scheme }}
    {{- end }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: {{ .values.probes.livenessPath }}
    port: {{ .port }}
    {{- if .scheme }}
    scheme: {{ .scheme }}
    {{- end }}
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}

{{/*
CRC-32 (IEEE 802.3, as Python's zlib.crc32) of a string, printed in decimal.
The queue client places each queue name on one queue replica, the URL at index
crc32(name) % len(urls). Templates have no bitwise operators, so each XOR runs
bit by bit with div and mod.
*/}}
{{- define "gpu-telemetry.crc32" -}}
{{- $crc := 4294967295 -}}
{{- range $position := until (len $) -}}
{{- $low := mod $crc 256 -}}
{{- $left := $low -}}
{{- $right := int (index $ $position) -}}
{{- $mixed := 0 -}}
{{- $bit := 1 -}}
{{- range until 8 -}}
{{- if ne (mod $left 2) (mod $right 2) }}{{ $mixed = add $mixed $bit }}{{ end -}}
{{- $left = div $left 2 -}}
{{- $right = div $right 2 -}}
{{- $bit = mul $bit 2 -}}
{{- end -}}
{{- $crc = add (sub $crc $low) $mixed -}}
{{- range until 8 -}}
{{- $odd := eq (mod $crc 2) 1 -}}
{{- $crc = div $crc 2 -}}
{{- if $odd -}}
{{- $left = $crc -}}
{{- $right = 3988292384 -}}
{{- $mixed = 0 -}}
{{- $bit = 1 -}}
{{- range until 32 -}}
{{- if ne (mod $left 2) (mod $right 2) }}{{ $mixed = add $mixed $bit }}{{ end -}}
{{- $left = div $left 2 -}}
{{- $right = div $right 2 -}}
{{- $bit = mul $bit 2 -}}
{{- end -}}
{{- $crc = $mixed -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- sub 4294967295 $crc -}}
{{- end }}

{{/*
URL of the queue replica that contains one queue: (dict "urls" "http://a,http://b" "queue" "telemetry").
*/}}
{{- define "gpu-telemetry.queueUrlFor" -}}
{{- $urls := splitList "," .urls -}}
{{- index $urls (int (mod (atoi (include "gpu-telemetry.crc32" .queue)) (len $urls))) -}}
{{- end }}
