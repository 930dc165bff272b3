#include "common/certificate_expiry.h"

#include <filesystem>
#include <fstream>

#include "common/test_ca.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

TEST(CertificateExpiryTest, ReadsNotAfterAndReportsZeroForAnUnreadableFile) {
  const std::string dir = ::testing::TempDir() + "/certificate_expiry_test";
  std::filesystem::create_directories(dir);
  absl::StatusOr<TestCertificateAuthority> ca = TestCertificateAuthority::Create(dir);
  ASSERT_TRUE(ca.ok()) << ca.status();
  absl::StatusOr<TlsFiles> files = ca->Issue("server");
  ASSERT_TRUE(files.ok()) << files.status();

  // The test CA issues for 7 days.
  absl::StatusOr<absl::Time> not_after = CertificateNotAfter(files->cert);
  ASSERT_TRUE(not_after.ok()) << not_after.status();
  EXPECT_GT(*not_after, absl::Now() + absl::Hours(24 * 7 - 1));
  EXPECT_LT(*not_after, absl::Now() + absl::Hours(24 * 7 + 1));

  std::ofstream(dir + "/garbage.pem") << "-----BEGIN CERTIFICATE-----\nnot base64\n";
  EXPECT_THAT(CertificateNotAfter(dir + "/garbage.pem").status().message(),
              HasSubstr("no PEM certificate in"));
  EXPECT_THAT(CertificateNotAfter(dir + "/missing.pem").status().message(),
              HasSubstr("cannot open certificate"));

  TlsFiles broken = *files;
  broken.ca = dir + "/missing.pem";
  const std::vector<prometheus::MetricFamily> families =
      CertificateExpiryCollector(broken).Collect();
  ASSERT_EQ(families.size(), 1u);
  EXPECT_EQ(families[0].name, "moe_tls_certificate_expiry_timestamp_seconds");
  ASSERT_EQ(families[0].metric.size(), 2u);
  EXPECT_EQ(families[0].metric[0].label[0].value, "own");
  EXPECT_DOUBLE_EQ(families[0].metric[0].gauge.value,
                   absl::ToDoubleSeconds(*not_after - absl::UnixEpoch()));
  EXPECT_EQ(families[0].metric[1].label[0].value, "ca");
  EXPECT_EQ(families[0].metric[1].gauge.value, 0.0);
}

}  // namespace
}  // namespace moe
