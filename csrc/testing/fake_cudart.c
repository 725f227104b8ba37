/* Fake CUDA runtime for CPU-only tests of tfz._C's CUDA-event branch.
 *
 * Build: gcc -O2 -shared -fPIC fake_cudart.c -o libfakecudart.so [-DFAKE_OMIT_SYNC]
 * Select it with TFZ_CUDART_PATH=/path/libfakecudart.so.
 *
 * Model: the k-th cudaEventRecord in the process (k = 0, 1, ...) stamps its event at 0.5 * k * k ms.
 * An event is complete only after cudaEventSynchronize was called on an event of the same stream recorded
 * at or after it; cudaEventElapsedTime returns cudaErrorNotReady (600) otherwise, and computes in double
 * like the real runtime (64-bit nanosecond clocks), returning float milliseconds.
 * Devices: FAKE_CUDART_DEVICES (default 1); events remember the device current at creation and can be
 * recorded only while that device is current (cudaErrorInvalidResourceHandle otherwise).
 * Counters for the tests: fake_cudart_counter(name), fake_cudart_record_stream(k). */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int cudaError_t;
enum {
  kSuccess = 0,
  kInvalidValue = 1,
  kInvalidDevice = 101,
  kInvalidHandle = 400,
  kNotReady = 600,
};

#define MAX_STREAMS 64
#define MAX_RECORDS 65536
#define MAGIC 0x7466a5e7

typedef struct {
  int magic;
  int device;
  int recorded;
  int64_t seq;
  uintptr_t stream;
} FakeEvent;

static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;
static int g_device = 0;
static int64_t g_records = 0, g_syncs = 0, g_created = 0, g_destroyed = 0, g_elapsed = 0, g_set_device = 0;
static int64_t g_wrong_device = 0;
static int64_t g_last_flags = -1, g_last_event_device = -1;
static uintptr_t g_record_stream[MAX_RECORDS];
static uintptr_t g_stream_ids[MAX_STREAMS];
static int64_t g_stream_synced[MAX_STREAMS]; /* highest seq synchronised on that stream */
static int g_num_streams = 0;

static int device_count(void) {
  const char* env = getenv("FAKE_CUDART_DEVICES");
  return env != NULL ? atoi(env) : 1;
}

static int64_t* synced_for(uintptr_t stream) {
  for (int i = 0; i < g_num_streams; ++i) {
    if (g_stream_ids[i] == stream) return &g_stream_synced[i];
  }
  if (g_num_streams == MAX_STREAMS) return NULL;
  g_stream_ids[g_num_streams] = stream;
  g_stream_synced[g_num_streams] = -1;
  return &g_stream_synced[g_num_streams++];
}

static int valid(const FakeEvent* event) { return event != NULL && event->magic == MAGIC; }

static int complete(const FakeEvent* event) {
  int64_t* synced = synced_for(event->stream);
  return event->recorded && synced != NULL && *synced >= event->seq;
}

cudaError_t cudaGetDeviceCount(int* count) {
  int n = device_count();
  if (n < 0) return 100; /* cudaErrorNoDevice */
  *count = n;
  return kSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  pthread_mutex_lock(&g_mutex);
  *device = g_device;
  pthread_mutex_unlock(&g_mutex);
  return kSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return kInvalidDevice;
  pthread_mutex_lock(&g_mutex);
  g_device = device;
  g_set_device++;
  pthread_mutex_unlock(&g_mutex);
  return kSuccess;
}

cudaError_t cudaEventCreateWithFlags(void** event, unsigned flags) {
  FakeEvent* created = calloc(1, sizeof(FakeEvent));
  if (created == NULL) return 2; /* cudaErrorMemoryAllocation */
  pthread_mutex_lock(&g_mutex);
  created->magic = MAGIC;
  created->device = g_device;
  g_last_flags = flags;
  g_last_event_device = g_device;
  g_created++;
  pthread_mutex_unlock(&g_mutex);
  *event = created;
  return kSuccess;
}

cudaError_t cudaEventRecord(void* event, void* stream) {
  FakeEvent* e = event;
  if (!valid(e)) return kInvalidHandle;
  pthread_mutex_lock(&g_mutex);
  if (e->device != g_device) {
    g_wrong_device++;
    pthread_mutex_unlock(&g_mutex);
    return kInvalidHandle;
  }
  e->seq = g_records;
  e->stream = (uintptr_t)stream;
  e->recorded = 1;
  if (g_records < MAX_RECORDS) g_record_stream[g_records] = (uintptr_t)stream;
  g_records++;
  pthread_mutex_unlock(&g_mutex);
  return kSuccess;
}

#ifndef FAKE_OMIT_SYNC
cudaError_t cudaEventSynchronize(void* event) {
  FakeEvent* e = event;
  if (!valid(e) || !e->recorded) return kInvalidHandle;
  pthread_mutex_lock(&g_mutex);
  int64_t* synced = synced_for(e->stream);
  if (synced != NULL && *synced < e->seq) *synced = e->seq;
  g_syncs++;
  pthread_mutex_unlock(&g_mutex);
  return kSuccess;
}
#endif

cudaError_t cudaEventElapsedTime(float* ms, void* start, void* end) {
  FakeEvent* a = start;
  FakeEvent* b = end;
  if (!valid(a) || !valid(b) || !a->recorded || !b->recorded) return kInvalidHandle;
  cudaError_t err = kSuccess;
  pthread_mutex_lock(&g_mutex);
  g_elapsed++;
  if (!complete(a) || !complete(b)) {
    err = kNotReady;
  } else {
    *ms = (float)(0.5 * (double)b->seq * (double)b->seq - 0.5 * (double)a->seq * (double)a->seq);
  }
  pthread_mutex_unlock(&g_mutex);
  return err;
}

cudaError_t cudaEventDestroy(void* event) {
  FakeEvent* e = event;
  if (!valid(e)) return kInvalidHandle;
  e->magic = 0;
  free(e);
  pthread_mutex_lock(&g_mutex);
  g_destroyed++;
  pthread_mutex_unlock(&g_mutex);
  return kSuccess;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case kSuccess:
      return "fake: no error";
    case kInvalidValue:
      return "fake: invalid value";
    case kInvalidDevice:
      return "fake: invalid device ordinal";
    case kInvalidHandle:
      return "fake: invalid resource handle";
    case kNotReady:
      return "fake: device not ready";
    default:
      return "fake: unknown error";
  }
}

int64_t fake_cudart_counter(const char* name) {
  int64_t value = -1;
  pthread_mutex_lock(&g_mutex);
  if (strcmp(name, "records") == 0) value = g_records;
  if (strcmp(name, "syncs") == 0) value = g_syncs;
  if (strcmp(name, "created") == 0) value = g_created;
  if (strcmp(name, "destroyed") == 0) value = g_destroyed;
  if (strcmp(name, "elapsed") == 0) value = g_elapsed;
  if (strcmp(name, "set_device") == 0) value = g_set_device;
  if (strcmp(name, "wrong_device") == 0) value = g_wrong_device;
  if (strcmp(name, "device") == 0) value = g_device;
  if (strcmp(name, "last_flags") == 0) value = g_last_flags;
  if (strcmp(name, "last_event_device") == 0) value = g_last_event_device;
  pthread_mutex_unlock(&g_mutex);
  return value;
}

uint64_t fake_cudart_record_stream(int64_t k) {
  return (k >= 0 && k < MAX_RECORDS) ? (uint64_t)g_record_stream[k] : 0;
}
