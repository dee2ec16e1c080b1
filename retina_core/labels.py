"""Class names shared by phantoms, data set adapters and model cfgs (one spelling everywhere)."""

# ICDR diabetic retinopathy grades, index == APTOS `diagnosis` value.
DR_GRADES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
# Kermany OCT2017 folder names.
OCT4 = ("CNV", "DME", "DRUSEN", "NORMAL")
# Retinal OCT-C8 folder names.
OCT8 = ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL")
# 4-class eye disease data set (Kaggle folder names; IEEE DataPort maps 1..4 onto these via cat_to_name.json).
FUNDUS4 = ("cataract", "diabetic_retinopathy", "glaucoma", "normal")
# Diabetic macular oedema present / absent (the Mexico fundus + OCT set's folder names).
DME2 = ("noDME", "DME")
