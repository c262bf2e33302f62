{{/* Names and labels. */}}
{{- define "usher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "usher.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "usher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "usher.labels" -}}
helm.sh/chart: {{ include "usher.chart" . }}
app.kubernetes.io/name: {{ include "usher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "usher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usher.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "usher.componentName" -}}
{{- printf "%s-%s" (include "usher.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "usher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "usher.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "usher.secretName" -}}
{{- default (include "usher.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "usher.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The four binaries: their ports, the gRPC name that is their readiness, the
sections they read (each binary refuses keys it does not know) and the
secret keys they need.
*/}}
{{- define "usher.components" -}}
gateway:
  binary: usher-gateway
  grpcPort: 8080
  metricsPort: 9100
  readiness: usher.identity.v1.AuthService
  database: false
  redis: true
  amqp: false
  links: false
  seal: false
  tokens: true
  secrets:
    USHER_REDIS__URL: {key: redis-url}
    USHER_REDIS__SENTINEL_PASSWORD: {key: redis-sentinel-password, optional: true}
    USHER_TOKENS__HMAC_KEY: {key: token-hmac-key}
    USHER_ASSERTION__SIGNING_KEY: {key: gateway-signing-key}
identity:
  binary: usher-identity
  grpcPort: 50061
  metricsPort: 9101
  readiness: usher.identity.v1.UserService
  database: true
  redis: true
  amqp: true
  links: true
  seal: true
  tokens: true
  secrets:
    USHER_DATABASE__URL: {key: identity-database-url}
    USHER_REDIS__URL: {key: redis-url}
    USHER_REDIS__SENTINEL_PASSWORD: {key: redis-sentinel-password, optional: true}
    USHER_AMQP__URL: {key: amqp-url}
    USHER_TOKENS__HMAC_KEY: {key: token-hmac-key}
    USHER_SEAL__KEY: {key: seal-key}
    USHER_ASSERTION__SIGNING_KEY: {key: identity-signing-key}
invitation:
  binary: usher-invitation
  grpcPort: 50062
  metricsPort: 9102
  readiness: usher.invitation.v1.InvitationService
  database: true
  redis: true
  amqp: true
  links: true
  seal: true
  tokens: true
  secrets:
    USHER_DATABASE__URL: {key: invitation-database-url}
    USHER_REDIS__URL: {key: redis-url}
    USHER_REDIS__SENTINEL_PASSWORD: {key: redis-sentinel-password, optional: true}
    USHER_AMQP__URL: {key: amqp-url}
    USHER_TOKENS__HMAC_KEY: {key: token-hmac-key}
    USHER_SEAL__KEY: {key: seal-key}
    USHER_ASSERTION__SIGNING_KEY: {key: invitation-signing-key}
notification:
  binary: usher-notification
  grpcPort: 50063
  metricsPort: 9103
  readiness: usher.notification.v1.NotificationService
  database: true
  redis: false
  amqp: true
  links: true
  seal: true
  tokens: false
  secrets:
    USHER_DATABASE__URL: {key: notification-database-url}
    USHER_AMQP__URL: {key: amqp-url}
    USHER_SEAL__KEY: {key: seal-key}
    USHER_ASSERTION__SIGNING_KEY: {key: notification-signing-key}
    USHER_SMTP__PASSWORD: {key: smtp-password, optional: true}
{{- end -}}

{{/* A value as an USHER_* variable reads it: lists as [..], maps as {"k"=v}. */}}
{{- define "usher.envValue" -}}
{{- if kindIs "slice" . -}}
{{- toJson . -}}
{{- else if kindIs "map" . -}}
{{- $parts := list -}}
{{- range $k, $v := . -}}
{{- $parts = append $parts (printf "%s=%s" (toJson (toString $k)) (toJson $v)) -}}
{{- end -}}
{{- printf "{%s}" (join "," $parts) -}}
{{- else if kindIs "float64" . -}}
{{- /* YAML numbers arrive as float64: print integers without exponent. */ -}}
{{- if eq . (floor .) -}}{{- printf "%.0f" . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
The non-secret settings of one component, as USHER_* variables:
(dict "root" $ "component" "identity"). Used by its ConfigMap and by the
migration Job.
*/}}
{{- define "usher.configEnv" -}}
{{- $root := .root -}}
{{- $name := .component -}}
{{- $c := index (fromYaml (include "usher.components" $root)) $name -}}
{{- $v := $root.Values -}}
{{- $env := dict -}}
{{- $_ := set $env "USHER_ENVIRONMENT" $v.environment -}}
{{- $_ := set $env "USHER_TELEMETRY__LOG_FILTER" $v.logFilter -}}
{{- $_ := set $env "USHER_TELEMETRY__LOG_FORMAT" $v.logFormat -}}
{{- if $v.tracing.otlpEndpoint -}}
{{- $_ := set $env "USHER_TELEMETRY__OTLP_ENDPOINT" $v.tracing.otlpEndpoint -}}
{{- $_ := set $env "USHER_TELEMETRY__TRACE_SAMPLE_RATIO" (toString $v.tracing.sampleRatio) -}}
{{- end -}}
{{- $_ := set $env "USHER_SERVER__LISTEN" (printf "0.0.0.0:%v" $c.grpcPort) -}}
{{- $_ := set $env "USHER_SERVER__METRICS_LISTEN" (printf "0.0.0.0:%v" $c.metricsPort) -}}
{{- if $v.assertion.trustedIssuers -}}
{{- $_ := set $env "USHER_ASSERTION__TRUSTED_ISSUERS" (include "usher.envValue" $v.assertion.trustedIssuers) -}}
{{- end -}}
{{- if $c.database -}}
{{- $_ := set $env "USHER_DATABASE__MIGRATE_ON_START" (ternary "false" "true" $v.migrations.enabled) -}}
{{- end -}}
{{- if $c.redis -}}
{{- $_ := set $env "USHER_REDIS__KEY_PREFIX" $v.redisKeyPrefix -}}
{{- $_ := set $env "USHER_REDIS__WAIT_REPLICAS" (toString $v.redisWaitReplicas) -}}
{{- $_ := set $env "USHER_REDIS__WAIT_TIMEOUT_MS" (toString $v.redisWaitTimeoutMs) -}}
{{- end -}}
{{- if $c.links -}}
{{- $_ := set $env "USHER_LINKS__PUBLIC_BASE_URL" $v.publicBaseUrl -}}
{{- end -}}
{{- if $c.seal -}}
{{- $_ := set $env "USHER_SEAL__KEY_ID" $v.sealKeyId -}}
{{- end -}}
{{- if eq $name "gateway" -}}
{{- range $up := list "identity" "invitation" "notification" -}}
{{- $u := index (fromYaml (include "usher.components" $root)) $up -}}
{{- $_ := set $env (printf "USHER_UPSTREAMS__%s" (upper $up)) (printf "http://%s:%v" (include "usher.componentName" (dict "root" $root "component" $up)) (index $v $up).service.port) -}}
{{- end -}}
{{- end -}}
{{- if eq $name "invitation" -}}
{{- $_ := set $env "USHER_IDENTITY__URL" (printf "http://%s:%v" (include "usher.componentName" (dict "root" $root "component" "identity")) $v.identity.service.port) -}}
{{- end -}}
{{- if eq $name "notification" -}}
{{- $_ := set $env "USHER_SMTP__TRANSPORT" "smtp" -}}
{{- $_ := set $env "USHER_SMTP__HOST" $v.smtp.host -}}
{{- $_ := set $env "USHER_SMTP__PORT" (include "usher.envValue" $v.smtp.port) -}}
{{- $_ := set $env "USHER_SMTP__TLS" $v.smtp.tls -}}
{{- $_ := set $env "USHER_SMTP__FROM" $v.smtp.from -}}
{{- if $v.smtp.username -}}
{{- $_ := set $env "USHER_SMTP__USERNAME" $v.smtp.username -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := (index $v $name).config -}}
{{- $_ := set $env (printf "USHER_%s" (upper (replace "." "__" $key))) (include "usher.envValue" $value) -}}
{{- end -}}
{{- range $key, $value := $env }}
{{ $key }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}

{{/* The secret variables of one component: (dict "root" $ "component" "identity"). */}}
{{- define "usher.secretEnv" -}}
{{- $c := index (fromYaml (include "usher.components" .root)) .component -}}
{{- $secret := include "usher.secretName" .root -}}
{{- range $name, $ref := $c.secrets }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end -}}
{{- end -}}
